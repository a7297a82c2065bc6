"""`evoclone twins ...`: train, apply and evaluate twin models on one machine (data scientists)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

twins_app = typer.Typer(no_args_is_help=True,
                        help="Twin models on one machine: train (optionally DP), predict, generate, evaluate.")

ModelDir = Annotated[Path, typer.Option("--model", help="model directory written by `twins train` or `evoclone train`")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
Events = Annotated[Path | None, typer.Option("--events", help="long events CSV: patient_id,time,code,value,unit")]
Seed = Annotated[int, typer.Option(help="random seed")]


@contextmanager
def _progress(description: str):
    from .main import err

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task(description, total=None)

        def step(done: int, total: int | None = None) -> None:
            progress.update(task, completed=done, total=total)

        def advance(k: int) -> None:
            progress.advance(task, k)

        yield step, advance


def _run(fn, *args, **kwargs):
    from .main import fail
    from .twins_jobs import TwinsInputError

    try:
        return fn(*args, **kwargs)
    except TwinsInputError as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:
        raise fail(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}", 1) from None


@twins_app.command()
def train(
    data: Annotated[Path, typer.Option(help="patients CSV: one row per patient")],
    treatment: Annotated[str, typer.Option(help="treatment column (two arms)")],
    out: Annotated[Path, typer.Option(help="model directory to write (a generator and a predictor may share one)")],
    model: Annotated[str, typer.Option(help="gpt (twin generator) or fusion (outcome predictor)")] = "fusion",
    time: Annotated[str | None, typer.Option(help="time-to-event column (days)")] = None,
    event: Annotated[str | None, typer.Option(help="event indicator column (1 event, 0 censored)")] = None,
    binary: Annotated[str | None, typer.Option(help="binary endpoint column (0/1)")] = None,
    continuous: Annotated[str | None, typer.Option(help="continuous endpoint column")] = None,
    events: Events = None,
    covariates: Annotated[str | None, typer.Option(help="comma-separated covariate columns (default: all others)")] = None,
    id_column: Annotated[str | None, typer.Option("--id", help="patient id column joining --events")] = None,
    epsilon: Annotated[float | None, typer.Option(help="DP budget; omit for non-private training")] = None,
    delta: Annotated[float, typer.Option(help="DP delta")] = 1e-5,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 0,
    batch_size: Annotated[int, typer.Option(help="(expected) batch size")] = 0,
    lr: Annotated[float, typer.Option(help="learning rate")] = 0.0,
    size: Annotated[str, typer.Option(help="generator size: small, medium or large")] = "small",
    members: Annotated[int, typer.Option(help="fusion ensemble members")] = 5,
    max_len: Annotated[int, typer.Option(help="generator context length in tokens")] = 512,
    indication: Annotated[str | None, typer.Option(help="trial indication (generator metadata token)")] = None,
    phase: Annotated[str | None, typer.Option(help="trial phase (generator metadata token)")] = None,
    endpoint_name: Annotated[str | None, typer.Option("--endpoint", help="endpoint name (generator metadata token)")] = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Train a twin generator (gpt) or outcome predictor (fusion) on a local table.

    Example: evoclone twins train --data gbsg2.csv --treatment horTh --time time --event cens --model fusion --epsilon 3 --out ./model
    """
    from evoclone.federated.tabular import OutcomeColumns

    from .main import err, fail
    from .twins_jobs import Columns, fingerprint, load_table, train_fusion, train_gpt

    if model not in ("gpt", "fusion"):
        raise fail(f"--model must be gpt or fusion, got {model!r}", 2)
    try:
        outcome = OutcomeColumns(time=time, event=event, binary=binary, continuous=continuous)
    except ValueError as exc:
        raise fail(f"{exc} (--time/--event, --binary or --continuous)", 2) from None
    cols = Columns(treatment=treatment, outcome=outcome,
                   covariates=[c.strip() for c in covariates.split(",") if c.strip()] if covariates else None,
                   id_column=id_column)
    if not 0 < delta < 1:
        raise fail(f"--delta must be in (0, 1), got {delta}", 2)
    table = _run(load_table, data, events, cols)
    fp = fingerprint(data, events)
    with _progress(f"training the {model} model" + (f" (DP, epsilon {epsilon})" if epsilon else "")) as (step, _):
        if model == "gpt":
            meta = {k: v for k, v in (("indication", indication), ("phase", phase), ("endpoint", endpoint_name)) if v}
            summary = _run(train_gpt, table, out=out, cols=cols, data_fp=fp, epsilon=epsilon, delta=delta,
                           epochs=epochs or 20, size=size, batch_size=batch_size or 64, lr=lr or 3e-3, seed=seed,
                           max_len=max_len, meta=meta, on_step=step)
        else:
            summary = _run(train_fusion, table, out=out, cols=cols, data_fp=fp, epsilon=epsilon, delta=delta,
                           epochs=epochs or 30, batch_size=batch_size or 32, lr=lr or 3e-3, seed=seed,
                           members=members, on_step=step)
    for w in summary.pop("warnings", []):
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        eps = "not private" if summary["epsilon"] is None else f"epsilon {summary['epsilon']} (delta {summary['delta']})"
        err.print(f"validation {summary['metric']}: {summary['value']}   {eps}   model: {out}")


@twins_app.command()
def predict(model_dir: ModelDir, patients: Annotated[Path, typer.Option(help="patients CSV")],
            events: Events = None,
            arm: Annotated[str | None, typer.Option(help="predict everyone under this arm (default: the treatment column)")] = None,
            as_json: AsJson = False) -> None:
    """Risk, 95% interval, risk category and top features for every input row, in input order.

    Example: evoclone twins predict --model ./model --patients new_patients.csv --json
    """
    from .main import err
    from .twins_jobs import predict as run_predict

    doc = _run(run_predict, model_dir, patients, events, arm=arm)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    from rich.table import Table

    t = Table("row", "risk", "95% CI", "category", "top features", title=f"predictions ({doc['risk_definition']})")
    for p in doc["predictions"]:
        t.add_row(str(p["row"]), f"{p['risk']:.3f}", f"{p['ci_low']:.3f}-{p['ci_high']:.3f}", p["category"],
                  ", ".join(p["top_features"]))
    err.print(t)


@twins_app.command()
def generate(model_dir: ModelDir, patients: Annotated[Path, typer.Option(help="patients CSV to condition on")],
             arm: Annotated[str, typer.Option(help="arm to simulate: control, treatment or a training level")],
             out: Annotated[Path, typer.Option(help="JSON file to write the twins to")],
             n: Annotated[int, typer.Option("--n", help="twins per patient")] = 1,
             events: Events = None,
             temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
             top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.95,
             max_tries: Annotated[int, typer.Option(help="regenerations of a twin that fails the quality gate")] = 3,
             seed: Seed = 0, as_json: AsJson = False) -> None:
    """Generate K gated twins per patient under one arm (counterfactual twins: run both arms).

    Example: evoclone twins generate --model ./model --patients cohort.csv --events events.csv --arm treatment --n 5 --out twins.json
    """
    from .main import err
    from .twins_jobs import generate as run_generate
    from .twins_jobs import write_json

    with _progress("generating twins") as (_, advance):
        doc = _run(run_generate, model_dir, patients, events, arm=arm, n=n, temperature=temperature, top_p=top_p,
                   max_tries=max_tries, seed=seed, on_batch=advance)
    _run(write_json, out, doc)
    s = doc["stats"]
    summary = {"out": str(out), "arm": doc["arm"], **{k: s[k] for k in ("requested", "passed", "failed",
                                                                           "first_try_pass_rate")}}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        err.print(f"{s['passed']} of {s['requested']} twins passed the quality gate "
                  f"({s['failed']} failed after {max_tries} tries) -> {out}")
    for w in doc["warnings"] + [s[k] for k in ("warning", "warning_unknown") if k in s]:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


@twins_app.command()
def evaluate(model_dir: ModelDir, real: Annotated[Path, typer.Option(help="real patients CSV (with outcomes)")],
             events: Events = None, seed: Seed = 0, as_json: AsJson = False) -> None:
    """Fidelity, utility (TSTR vs TRTR) and privacy (membership inference, NNAA) of a generator.

    Example: evoclone twins evaluate --model ./model --real cohort.csv --events events.csv --json
    """
    from .main import err
    from .twins_jobs import evaluate as run_evaluate

    with _progress("generating twins for evaluation") as (_, advance):
        doc = _run(run_evaluate, model_dir, real, events, seed=seed, on_batch=advance)
    if as_json:
        typer.echo(json.dumps(doc, default=float))
        return
    f, u, p = doc["fidelity"], doc["utility"], doc["privacy"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    err.print(f"fidelity: unigram R2 {fmt(f['unigram_r2'])}, bigram R2 {fmt(f['bigram_r2'])}")
    err.print(f"utility:  TSTR {fmt(u['tstr'])} vs TRTR {fmt(u['trtr'])} (C-index on held-out patients)")
    err.print(f"privacy:  membership inference AUC {fmt(p['mia_auc'])}, NNAA {fmt(p['nnaa'])}")
