"""The `headlab` command line. Every HeadlabError is printed as one clear line (exit code 2).

The commands live in `headlab.commands` (one module per group); this module builds the typer app, registers
them, each wrapped in `_friendly`, and generates `headlab report NAME` from the report registry.
"""

from __future__ import annotations

import functools

import typer

from headlab.commands import act, analyze, models, report, store, zoo
from headlab.commands.console import say_error
from headlab.compat import cli_exceptions
from headlab.errors import HeadlabError

app = typer.Typer(help="headlab: capture, analyse and intervene on attention heads.", no_args_is_help=True)
zoo_app = typer.Typer(
    help="Models that run without a hub: tiny random models of real architectures.", no_args_is_help=True
)
app.add_typer(zoo_app, name="zoo")
act_app = typer.Typer(
    help="ACT (Yu et al., ICML 2024): calibrate hidden attention sinks, search the heads.",
    no_args_is_help=True,
)
app.add_typer(act_app, name="act")
report_app = typer.Typer(help="Benchmark reports (HTML + JSON + Markdown).", no_args_is_help=True)
app.add_typer(report_app, name="report")
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HeadlabError as err:
            say_error(str(err))
            raise typer.Exit(2) from None

    return wrapper


def main() -> None:
    """The `headlab` console script: the typer app, with a usage error (a bad option value, a missing
    argument) printed as one `headlab:` line like every other error, exit code 2."""
    errors = cli_exceptions()
    try:
        code = app(standalone_mode=False)
    except errors.NoArgsIsHelpError as err:
        err.show()
        code = 2
    except errors.UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "headlab"
        say_error(f"{err.format_message()} (see `{command} --help`)")
        code = 2
    except errors.Abort:
        code = 130
    raise SystemExit(code or 0)


app.command("info")(_friendly(models.info))
app.command("check", epilog=models.EXIT_CODES)(_friendly(models.check))
app.command("stats")(_friendly(models.stats))
app.command("capture")(_friendly(store.capture))
store_app.command("verify")(_friendly(store.verify))
store_app.command("info")(_friendly(store.info))
app.command("analyze", epilog=analyze.EXIT_CODES)(_friendly(analyze.analyze))
app.command("dash")(_friendly(analyze.dash))
zoo_app.command("random")(_friendly(zoo.random))
zoo_app.command("list")(_friendly(zoo.listing))
zoo_app.command("train")(_friendly(zoo.train))
act_app.command("search")(_friendly(act.search))
report.register(report_app, _friendly)
app.command("demo")(_friendly(models.demo))

if __name__ == "__main__":
    app()
