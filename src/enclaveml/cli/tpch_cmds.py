"""``enclaveml tpch ...``: generate TPC-H as encrypted Parquet, run the 22 queries, check the answers."""

from __future__ import annotations

import json

import click
from rich.table import Table

from enclaveml.cli._app import App, err_console, out_console, pass_app, progress_bar
from enclaveml.errors import EnclaveMLError

__all__ = ["tpch"]


class WrongAnswers(EnclaveMLError):
    """At least one TPC-H query returned a result that differs from the reference answer."""

    exit_code = 1
    default_hint = "the table above shows where each wrong result differs"


def _query_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    if value is None:
        return list(range(1, 23))
    try:
        chosen = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of query numbers, e.g. 1,3,5", ctx, param) from None
    if not chosen or any(not 1 <= q <= 22 for q in chosen):
        raise click.BadParameter(f"{value!r}: queries are numbered 1 to 22", ctx, param)
    return chosen


@click.group()
def tpch() -> None:
    """TPC-H on encrypted Parquet: generate the tables, run the 22 queries, check the answers.

    \b
    Example:
      enclaveml tpch gen --sf 0.01 --out data/tpch --encrypt --key customers
      enclaveml tpch run data/tpch --check
    """


@tpch.command("gen")
@click.option("--sf", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Scale factor.")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Directory for the tables and tpch.json.")
@click.option("--encrypt", is_flag=True, help="Write encrypted Parquet (needs --key).")
@click.option("--key", metavar="NAME", help="KMS key that wraps each file's data key.")
@click.option(
    "--flavour",
    type=click.Choice(["duckdb", "standard"]),
    default="duckdb",
    show_default=True,
    help="duckdb: DuckDB's fast path; standard: readable by pyarrow and Spark.",
)
@click.option(
    "--generator",
    type=click.Choice(["tpchgen", "dbgen"]),
    default="tpchgen",
    show_default=True,
    help="tpchgen-cli (the TPC's dbgen), or DuckDB's dbgen (the data its reference answers were made on).",
)
@pass_app
def gen(app: App, sf: float, out_dir: str, encrypt: bool, key: str | None, flavour: str, generator: str) -> None:
    """Generate the eight TPC-H tables; plaintext never touches the disk when encrypting.

    \b
    Example:
      enclaveml tpch gen --sf 1 --out data/tpch --encrypt --key customers
      enclaveml tpch gen --sf 0.01 --out data/tpch-plain
    """
    from enclaveml.analytics import tpch as bench

    if encrypt != (key is not None):
        raise click.UsageError("--encrypt and --key go together: --encrypt --key NAME")
    kms = app.open_kms() if encrypt else None
    with progress_bar("tables", len(bench.TABLES), unit="tables") as advance:
        manifest = bench.generate(
            sf,
            out_dir,
            kms=kms,
            key=key,
            flavour="standard" if flavour == "standard" else "duckdb",
            generator="dbgen" if generator == "dbgen" else "tpchgen",
            progress=lambda _table: advance(1),
        )
    what = f"encrypted ({manifest.flavour} flavour, key {key})" if encrypt else "plaintext"
    err_console.print(f"wrote TPC-H SF {sf} to {out_dir}: 8 tables, {what}, generator {generator}")


@tpch.command("run")
@click.argument("data_dir", metavar="DIR")
@click.option(
    "--engine",
    type=click.Choice(["duckdb", "spark"]),
    default="duckdb",
    show_default=True,
    help="Query engine (spark: standard-flavour tables).",
)
@click.option("--plain", is_flag=True, help="The tables are plaintext Parquet (no key store needed).")
@click.option("--queries", callback=_query_list, metavar="N,N,...", help="Queries to run [default: 1-22].")
@click.option("--check", "check_answers", is_flag=True, help="Compare with DuckDB's answers (SF 0.01, 0.1, 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the timings (and checks) as JSON.")
@pass_app
def run(
    app: App, data_dir: str, engine: str, plain: bool, queries: list[int], check_answers: bool, as_json: bool
) -> None:
    """Run TPC-H queries on the tables in DIR and print each query's time; exit 1 if an answer is wrong.

    \b
    Example:
      enclaveml tpch run data/tpch --check
      enclaveml tpch run data/tpch-plain --plain --queries 1,3,5 --json
    """
    from enclaveml.analytics import tpch as bench

    manifest = bench.read_manifest(data_dir)
    if check_answers:
        bench.reference_answers(manifest.scale_factor)  # no answers for this SF: fail before running
    kms = None if plain else app.open_kms()
    with progress_bar("queries", len(queries), unit="queries") as advance:
        results = bench.run(
            data_dir, engine=engine, kms=kms, queries=queries, plain=plain, progress=lambda _r: advance(1)
        )
    checks = (
        {c.query: c for c in bench.check(results, manifest.scale_factor, generator=manifest.generator)}
        if check_answers
        else {}
    )
    if as_json:
        doc = {
            "data_dir": data_dir,
            "engine": engine,
            "scale_factor": manifest.scale_factor,
            "flavour": manifest.flavour,
            "generator": manifest.generator,
            "total_seconds": sum(r.seconds for r in results),
            "queries": [
                {
                    "query": r.query,
                    "seconds": r.seconds,
                    "rows": len(r.rows),
                    **({"check": checks[r.query].status, "reason": checks[r.query].reason} if checks else {}),
                }
                for r in results
            ],
        }
        out_console.print_json(json.dumps(doc))
    else:
        table = Table(title=f"TPC-H SF {manifest.scale_factor:g} on {engine}, {manifest.flavour} Parquet")
        table.add_column("query", justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("rows", justify="right")
        if checks:
            table.add_column("answer")
        for r in results:
            cells = [f"Q{r.query}", f"{r.seconds:.3f}", str(len(r.rows))]
            if checks:
                c = checks[r.query]
                cells.append(c.status + (f": {c.reason}" if c.reason else ""))
            table.add_row(*cells)
        table.add_section()
        table.add_row("total", f"{sum(r.seconds for r in results):.3f}", "", *([""] if checks else []))
        out_console.print(table)
    wrong = [c.query for c in checks.values() if c.failed]
    if wrong:
        raise WrongAnswers(
            f"{len(wrong)} of {len(results)} TPC-H answers are wrong: queries {', '.join(map(str, wrong))}"
        )
