"""`evoclone train`: the sponsor's one-command federated DP training from a table split by site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

err = Console(stderr=True)


def train(
    data: Annotated[Path, typer.Option(help="patients CSV: one row per patient, with a site column")],
    site_column: Annotated[str, typer.Option(help="column naming each row's hospital")],
    treatment: Annotated[str, typer.Option(help="treatment column (two arms)")],
    out: Annotated[Path, typer.Option(help="model directory to write (weights + manifest)")],
    time: Annotated[str | None, typer.Option(help="time-to-event column (days)")] = None,
    event: Annotated[str | None, typer.Option(help="event indicator column (1 event, 0 censored)")] = None,
    binary: Annotated[str | None, typer.Option(help="binary endpoint column (0/1)")] = None,
    continuous: Annotated[str | None, typer.Option(help="continuous endpoint column")] = None,
    events: Annotated[Path | None, typer.Option(help="long events CSV: patient_id,time,code,value,unit")] = None,
    covariates: Annotated[str | None, typer.Option(help="comma-separated covariates (default: every other column)")] = None,
    id_column: Annotated[str | None, typer.Option("--id", help="patient id column joining --events")] = None,
    model: Annotated[str, typer.Option(help="fusion (outcome predictor), gpt (twin generator) or both")] = "fusion",
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 5,
    epsilon: Annotated[float, typer.Option(help="privacy budget (epsilon) of every site")] = 3.0,
    delta: Annotated[float, typer.Option(help="DP delta of every site")] = 1e-5,
    engine: Annotated[str, typer.Option(help="deployment (one SuperNode process per site) or simulation")] = "deployment",
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam")] = "fedavg",
    local_epochs: Annotated[int, typer.Option(help="local epochs per round")] = 2,
    batch_size: Annotated[int, typer.Option(help="(expected) batch size")] = 32,
    lr: Annotated[float, typer.Option(help="local learning rate")] = 3e-3,
    members: Annotated[int, typer.Option(help="fusion ensemble members (privacy composes over them)")] = 1,
    min_sites: Annotated[int, typer.Option(help="sites that must train for a round to count (0: all)")] = 0,
    patience: Annotated[int, typer.Option(help="early stopping: rounds without validation improvement (0: off)")] = 0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    server_eval: Annotated[Path | None, typer.Option(help="reference cohort CSV the coordinator may hold (public or "
                                                     "synthetic, same columns): server-side evaluation every round")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="where the site nodes and coordinator state live "
                                                     "(default: .<out>.study beside --out)")] = None,
    secure_aggregation: Annotated[bool, typer.Option(help="SecAgg+: the coordinator sees only the sites' mean "
                                                          "update, never one site's")] = False,
    arm_shift_share: Annotated[float | None, typer.Option(
        help="share of --epsilon kept for re-estimating the arm's effect after training (fusion, time-to-event "
             "and binary endpoints; 0: off; default: the app's, 0.2). Higher: a steadier effect estimate for "
             "in-silico trials, a less accurate model on small sites (0 for prognosis only; see the sponsor "
             "guide)", min=0.0, max=0.95)] = None,
    insecure: Annotated[bool, typer.Option(help="test mode: no TLS and no node authentication")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing model directory")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
) -> None:
    """Train across sites with Flower and DP-SGD; each site's rows stay in its own node.

    Example: evoclone train --data trial.csv --site-column hospital --treatment arm --time days --event died --rounds 5 --epsilon 3 --out model/
    """
    from evoclone.federated.tabular import OutcomeColumns

    from .main import fail
    from .train_jobs import TrainInputError, TrainOptions, run_train

    try:
        outcome = OutcomeColumns(time=time, event=event, binary=binary, continuous=continuous)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    opts = TrainOptions(data=data, site_column=site_column, treatment=treatment, outcome=outcome, out=out,
                        events=events, covariates=[c.strip() for c in covariates.split(",")] if covariates else None,
                        id_column=id_column, model=model, rounds=rounds, epsilon=epsilon, delta=delta, engine=engine,
                        strategy=strategy, local_epochs=local_epochs, batch_size=batch_size, learning_rate=lr,
                        members=members, min_sites=min_sites, patience=patience, seed=seed, insecure=insecure,
                        work_dir=work_dir, force=force, server_eval=server_eval,
                        secure_aggregation=secure_aggregation,
                        extra_run_config={} if arm_shift_share is None else {"arm-shift-share": arm_shift_share})
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def on_progress(m: str, done: int, total: int) -> None:
        if m not in tasks:
            tasks[m] = progress.add_task(f"federated rounds ({m})", total=total)
        progress.update(tasks[m], completed=min(done, total))

    try:
        with progress:
            summary = run_train(opts, on_progress=on_progress)
    except (TrainInputError, FileExistsError) as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; every Flower process was stopped", 130) from None
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        raise fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    t = Table(title=f"Federated training ({summary['engine']}, {summary['strategy']})")
    for col in ("site", "patients", "epsilon budget", "epsilon spent"):
        t.add_column(col, justify="right")
    for s in summary["sites"]:
        t.add_row(s["name"], str(s["patients"]), f"{s['epsilon_budget']:g}", f"{s['epsilon_spent']:.3f}")
    err.print(t)
    for m, r in summary["models"].items():
        best = next((x for x in r["rounds"] if x["round"] == r["best_round"]), {})
        err.print(f"{m}: best round {r['best_round']} of {len(r['rounds'])}, validation metric "
                  f"{best.get('val_metric', float('nan')):.4f}, loss {best.get('val_loss', float('nan')):.4f}")
    err.print(f"model directory: {summary['model_dir']}")


app_app = typer.Typer(no_args_is_help=True, help="The Flower App bundle EvoClone trains with.")


@app_app.command("hash")
def app_hash(as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False) -> None:
    """sha256 of the training app bundle this installation submits (what sites approve).

    Example: evoclone app hash
    """
    from evoclone.coordinator.superlink import app_dir, fab_hash

    h = fab_hash()
    if as_json:
        typer.echo(json.dumps({"fab_hash": h, "app": str(app_dir())}))
    else:
        typer.echo(h)
