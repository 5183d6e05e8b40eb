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


# command -> (module in moetool.cli, function): only the module of the command being run is
# imported (each pulls in rich and its own options; `inspect --json` needs neither)
COMMANDS = {"inspect": ("inspect", "inspect"), "convert": ("convert", "convert"), "profile": ("profile", "profile"),
            "eval": ("evaluate", "evaluate"), "upcycle": ("upcycle", "upcycle"), "prune": ("prune", "prune"),
            "quantize": ("quantize", "quantize")}


def _register(args: list[str]) -> None:
    """Register the command ARGS run (the first argument that is not an option: the root
    callback's options take no values), or all of them for help, errors and completion."""
    from importlib import import_module

    wanted = next((a for a in args if not a.startswith("-")), None)
    for name, (module, function) in COMMANDS.items():
        if wanted in COMMANDS and name != wanted:
            continue
        if not any(c.name == name for c in app.registered_commands):
            app.command(name)(getattr(import_module(f"moetool.cli.{module}"), function))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning MoetoolError into a message and an exit code."""
    _register(sys.argv[1:] if argv is None else argv)
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
