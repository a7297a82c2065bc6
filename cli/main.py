"""Entry point of the `evoclone` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .audit import audit_app, drift_app
from .coordinator import coordinator_app
from .data import data_app
from .deploy import deploy_app
from .pki import pki_app
from .site import site_app
from .site_models import model_app as site_model_app
from .site_reports import report_app
from .sponsor import login as login_cmd
from .sponsor import model_app, round_app, study_app
from .train import app_app
from .train import train as train_cmd
from .trial import analyze_app, trial_app
from .twins import twins_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="EvoClone: federated, differentially private patient digital twins.")
app.add_typer(data_app, name="data")
app.add_typer(pki_app, name="pki")
app.add_typer(site_app, name="site")
site_app.add_typer(report_app, name="report")
site_app.add_typer(site_model_app, name="model")
app.add_typer(twins_app, name="twins")
app.add_typer(trial_app, name="trial")
app.add_typer(analyze_app, name="analyze")
app.command("train")(train_cmd)
app.add_typer(app_app, name="app")
app.add_typer(coordinator_app, name="coordinator")
app.command("login")(login_cmd)
app.add_typer(study_app, name="study")
app.add_typer(round_app, name="round")
app.add_typer(model_app, name="model")
app.add_typer(drift_app, name="drift")
app.add_typer(audit_app, name="audit")
app.add_typer(deploy_app, name="deploy")
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"evoclone {version('evoclone')}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the installed version and exit")] = False) -> None:
    """EvoClone: federated, differentially private patient digital twins."""


def fail(message: str, code: int) -> typer.Exit:
    """Print a one-line error and return the exit to raise."""
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("./evoclone-demo"),
    sites: Annotated[int, typer.Option(help="number of hospitals")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 3,
    patients: Annotated[int, typer.Option(help="patients over all hospitals")] = 600,
    epsilon: Annotated[float, typer.Option(help="privacy budget (epsilon) of every site")] = 3.0,
    delta: Annotated[float, typer.Option(help="DP delta of every site")] = 1e-5,
    seed: Annotated[int, typer.Option(help="simulation and training seed")] = 7,
    port: Annotated[int, typer.Option(help="SuperLink port; SuperNodes use the next ones (0: free ports)")] = 0,
    force: Annotated[bool, typer.Option(help="replace the output of a previous demo")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print summary.json on stdout")] = False,
) -> None:
    """Simulate hospitals, train a DP twin outcome model across them with Flower, report.

    Example: evoclone demo --sites 3 --rounds 3 --patients 600 --epsilon 3.0 --out ./evoclone-demo
    """
    from .demo import DemoInputError, DemoOptions, print_summary, run_demo

    opts = DemoOptions(out=out, sites=sites, rounds=rounds, patients=patients, epsilon=epsilon, delta=delta,
                       seed=seed, port=port, force=force)
    try:
        summary = run_demo(opts, console=err)
    except DemoInputError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; every Flower process was stopped", 130) from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        print_summary(summary, err)
        err.print(f"summary: {out / 'summary.json'}   report: {out / 'report.html'}")


def main() -> None:
    """Console-script entry point."""
    app()
