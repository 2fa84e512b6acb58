"""The ``enclaveml`` command: the root group and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import click
from rich.markup import escape

from enclaveml._version import __version__
from enclaveml.cli._app import App, err_console
from enclaveml.cli.attest_cmds import attest
from enclaveml.cli.broker_cmds import broker
from enclaveml.cli.certs_cmds import certs
from enclaveml.cli.convert_cmds import convert
from enclaveml.cli.datagen_cmds import datagen
from enclaveml.cli.doctor_cmds import doctor
from enclaveml.cli.enclave_cmds import enclave
from enclaveml.cli.file_cmds import decrypt, encrypt, inspect, rewrap
from enclaveml.cli.kms_cmds import kms
from enclaveml.cli.model_cmds import model
from enclaveml.cli.policy_cmds import policy
from enclaveml.cli.run_cmds import run
from enclaveml.cli.secret_prov_cmds import secret_prov
from enclaveml.cli.serve_client_cmds import serve_client
from enclaveml.cli.serve_cmds import serve
from enclaveml.cli.submit_cmds import submit
from enclaveml.cli.tpch_cmds import tpch
from enclaveml.errors import ConfigError, EnclaveMLError

__all__ = ["cli", "main"]

EXIT_INTERNAL = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="enclaveml")
@click.option(
    "--home",
    metavar="DIR",
    help="Directory of the embedded key store [default: $ENCLAVEML_HOME or ~/.enclaveml].",
)
@click.option("--debug", is_flag=True, help="Show a traceback when a command fails.")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """Privacy-preserving ML on confidential computing: encrypt data, manage keys, run in TEEs.

    \b
    Example:
      enclaveml kms init
      enclaveml kms create-key customers
      enclaveml encrypt people.csv people.csv.eml --key customers
      enclaveml decrypt people.csv.eml people.csv
    """
    ctx.obj = App.from_options(home, debug)


cli.add_command(kms)
cli.add_command(encrypt)
cli.add_command(decrypt)
cli.add_command(inspect)
cli.add_command(rewrap)
cli.add_command(convert)
cli.add_command(datagen)
cli.add_command(enclave)
cli.add_command(attest)
cli.add_command(policy)
cli.add_command(doctor)
cli.add_command(secret_prov)
cli.add_command(broker)
cli.add_command(run)
cli.add_command(submit)
cli.add_command(tpch)
cli.add_command(certs)
cli.add_command(model)
cli.add_command(serve)
cli.add_command(serve_client)


def _fail(message: str, code: int) -> int:
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    return code


def _root_debug_flag(args: list[str]) -> bool:
    """Whether ``--debug`` was given to the root command (a subcommand may own a ``--debug``)."""
    rest = iter(args)
    for arg in rest:
        if arg == "--debug":
            return True
        if arg == "--home":
            next(rest, None)
        elif not arg.startswith("-"):
            return False
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure is one line on stderr and a distinct exit code."""
    debug = _root_debug_flag(argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="enclaveml", standalone_mode=False)
    except click.exceptions.Abort:
        return _fail("interrupted", 130)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if isinstance(ctx, click.Context) else "enclaveml"
        return _fail(f"{exc.format_message()} (see `{command} --help`)", EXIT_USAGE)
    except EnclaveMLError as exc:
        if debug:
            traceback.print_exc()
        return _fail(exc.diagnostics(), exc.exit_code)
    except BrokenPipeError:
        # The reader of our stdout went away (`... | head`): stop quietly, as cat does, and
        # point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if debug:
            traceback.print_exc()
        what = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        return _fail(ConfigError(what, "check the path and its permissions").diagnostics(), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__} (run again with --debug and report it)", EXIT_INTERNAL)
    return 0
