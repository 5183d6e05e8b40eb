"""The `moetool` command: a thin typer layer over moetool.ops.

Errors are MoetoolError subclasses, mapped to one line on stderr and an exit code
here, once. --debug (or MOETOOL_DEBUG=1) shows the traceback instead.

typer is imported only when it parses: `moetool inspect SOURCE [flags]` is parsed here instead
(moetool.cli.inspect.fast_args). typer takes 70 ms to start and parse (it imports pydantic to
coerce option values), a third of the time a 90,000-tensor checkpoint's header read may take.
"""

import logging
import os
import sys
from typing import Annotated

from moetool import __version__
from moetool.cli.inspect import fast_args, run_inspect
from moetool.errors import MoetoolError

_state = {"debug": os.environ.get("MOETOOL_DEBUG", "") not in ("", "0")}

# command -> (module in moetool.cli, function): only the module of the command being run is
# imported (each pulls in rich and its own options; `inspect --json` needs neither). inspect's
# function builds its typer command, so that the module itself imports no typer.
COMMANDS = {"inspect": ("inspect", "typer_command"), "convert": ("convert", "convert"),
            "profile": ("profile", "profile"), "eval": ("evaluate", "evaluate"), "upcycle": ("upcycle", "upcycle"),
            "prune": ("prune", "prune"), "quantize": ("quantize", "quantize")}


def _configure_logging(debug: bool) -> None:
    if debug:
        _state["debug"] = True
    logging.basicConfig(level=logging.DEBUG if _state["debug"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _typer_app(args: list[str]):
    """The typer app, with the command ARGS run registered (the first argument that is not an
    option: the root callback's options take no values), or all of them for help, errors and
    completion."""
    from importlib import import_module

    import typer

    app = typer.Typer(
        name="moetool",
        help="Inspect, convert, profile, evaluate, upcycle, prune and quantize Mixture-of-Experts checkpoints.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"moetool {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        debug: Annotated[bool, typer.Option("--debug", metavar=" ", help="Show tracebacks and debug logs.")] = False,
        version: Annotated[bool, typer.Option("--version", metavar=" ", callback=_version, is_eager=True,
                                              help="Print the version and exit.")] = False,
    ) -> None:
        _configure_logging(debug)

    wanted = next((a for a in args if not a.startswith("-")), None)
    for name, (module, function) in COMMANDS.items():
        if wanted in COMMANDS and name != wanted:
            continue
        command = getattr(import_module(f"moetool.cli.{module}"), function)
        app.command(name)(command() if name == "inspect" else command)
    return app


def _fast_inspect(args: list[str]) -> dict | None:
    """run_inspect's arguments for `moetool [--debug] inspect SOURCE [flags]`, else None."""
    debug = 0
    while debug < len(args) and args[debug] == "--debug":
        debug += 1
    if args[debug:debug + 1] != ["inspect"]:
        return None
    found = fast_args(args[debug + 1:])
    if found is not None and debug:
        _state["debug"] = True
    return found


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning MoetoolError into a message and an exit code."""
    try:
        _main(argv)
    except SystemExit as exc:
        _leave_torchrun(exc.code)
        raise


def _leave_torchrun(code) -> None:
    """A torchrun rank ends with os._exit once its output is flushed: tearing down torch's C++ state
    (the gloo group's threads) at interpreter exit aborted a rank now and then ("terminate called
    without an active exception"), turning a finished run into a failed one. On success every rank
    first waits for the others, so none leaves while a peer still talks to it."""
    if "torch.distributed" not in sys.modules:   # never imports torch itself (inspect, --help)
        return
    from moetool.runner import distributed

    if not distributed.joined():
        return
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if status == 0:
        try:
            distributed.barrier()
        except MoetoolError as exc:   # a peer failed after all: its error, in one line
            sys.stderr.write(f"Error: {exc}\n")
            status = exc.exit_code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    parse_error: tuple = ()   # typer's exception classes, once typer is imported (not for fast inspect)
    abort: tuple = ()
    try:
        fast = _fast_inspect(args)
        if fast is None:
            import typer

            parse_error, abort = (typer.TyperException,), (typer.Abort,)
            # parse errors come back here, to be said in one line as moetool's are (with no command at
            # all, typer shows its own help)
            standalone = not [a for a in args if a != "--debug"]
            code = _typer_app(args)(args=argv, prog_name="moetool", standalone_mode=standalone)
            if code == 130:   # typer's answer to a KeyboardInterrupt
                sys.stderr.write("Interrupted\n")
            sys.exit(code if isinstance(code, int) else 0)
        else:
            _configure_logging(False)
            run_inspect(**fast)
            sys.exit(0)   # as typer ends: callers catching SystemExit get the code either way
    except MoetoolError as exc:
        if _state["debug"]:
            raise
        sys.stderr.write(f"Error: {exc}\n")
        if exc.hint:
            sys.stderr.write(f"Hint: {exc.hint}\n")
        sys.exit(exc.exit_code)
    except abort:
        sys.stderr.write("Interrupted\n")
        sys.exit(130)
    except parse_error as exc:   # a bad option or argument (exit 2)
        if _state["debug"]:
            raise
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"Error: {message}\n")
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            sys.stderr.write(f"Hint: see '{ctx.command_path} --help'\n")
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted\n")
        sys.exit(130)
    except BrokenPipeError:   # stdout closed early (`| head`): exit 1 quietly, as typer does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
