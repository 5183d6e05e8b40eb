"""The `moetool` command: a thin typer layer over moetool.ops.

Errors are MoetoolError subclasses, mapped to one line on stderr and an exit code
here, once. --debug (or MOETOOL_DEBUG=1) shows the traceback instead.
"""

import logging
import os
import sys
from typing import Annotated

import typer

from moetool import __version__
from moetool.errors import MoetoolError

app = typer.Typer(
    name="moetool",
    help="Inspect, convert, profile, evaluate, upcycle, prune and quantize Mixture-of-Experts checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
_state = {"debug": os.environ.get("MOETOOL_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moetool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        _state["debug"] = True
    logging.basicConfig(level=logging.DEBUG if _state["debug"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _register() -> None:
    from moetool.cli import convert as convert_cmd
    from moetool.cli import evaluate as eval_cmd
    from moetool.cli import inspect as inspect_cmd
    from moetool.cli import profile as profile_cmd
    from moetool.cli import prune as prune_cmd
    from moetool.cli import quantize as quantize_cmd
    from moetool.cli import upcycle as upcycle_cmd

    app.command("inspect")(inspect_cmd.inspect)
    app.command("convert")(convert_cmd.convert)
    app.command("profile")(profile_cmd.profile)
    app.command("eval")(eval_cmd.evaluate)
    app.command("upcycle")(upcycle_cmd.upcycle)
    app.command("prune")(prune_cmd.prune)
    app.command("quantize")(quantize_cmd.quantize)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning MoetoolError into a message and an exit code."""
    try:
        app(args=argv, prog_name="moetool")
    except MoetoolError as exc:
        if _state["debug"]:
            raise
        sys.stderr.write(f"Error: {exc}\n")
        if exc.hint:
            sys.stderr.write(f"Hint: {exc.hint}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted\n")
        sys.exit(130)
