"""``enclaveml datagen ...``: deterministic synthetic data sets."""

from __future__ import annotations

import sys

import click

from enclaveml.cli._app import err_console, progress_bar

__all__ = ["datagen"]


@click.group()
def datagen() -> None:
    """Generate deterministic synthetic data sets.

    \b
    Example:
      enclaveml datagen people --rows 1000000 -o people.csv
    """


@datagen.command("people")
@click.option("--rows", type=click.IntRange(min=0), default=1000, show_default=True, help="Number of rows.")
@click.option("-o", "--output", default="-", show_default=True, help="CSV file, or - for stdout.")
@click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True, help="Random seed.")
def people(rows: int, output: str, seed: int) -> None:
    """Write a people CSV (name, age, job, city, salary); same seed, same bytes.

    \b
    Example:
      enclaveml datagen people --rows 1000000 -o people.csv --seed 42
    """
    from enclaveml.datagen import write_people_csv  # numpy + pyarrow: only when generating

    with progress_bar("people", rows, unit="rows") as advance:
        target = sys.stdout.buffer if output == "-" else output
        written = write_people_csv(target, rows, seed=seed, progress=advance)
    if output != "-":
        err_console.print(f"wrote {written} rows to {output} (seed {seed})")
