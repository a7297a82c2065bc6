"""`evoclone trial ...` and `evoclone analyze ...`: in-silico trials and prognostic covariate adjustment."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .progress import StageBars

trial_app = typer.Typer(no_args_is_help=True, help="In-silico trials: every patient's twins under each arm.")
analyze_app = typer.Typer(no_args_is_help=True,
                          help="Trial analyses: prognostic covariate adjustment (PROCOVA) and sample size.")

AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
Report = Annotated[Path | None, typer.Option("--report", help="write a self-contained HTML report here")]
Alpha = Annotated[float, typer.Option(help="two-sided significance level (intervals are 1 - alpha)")]


def _split(value: str | None) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()] if value else []


def _run(fn, *args, **kwargs):
    from .main import fail
    from .trial_jobs import TrialInputError

    try:
        return fn(*args, **kwargs)
    except TrialInputError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except OSError as exc:
        raise fail(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}", 1) from None


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ci(e: dict) -> str:
    return f"{_num(e['estimate'])} ({_num(e['ci_low'])} to {_num(e['ci_high'])})"


@trial_app.command()
def simulate(
    model: Annotated[Path, typer.Option(help="model directory written by `evoclone train` or `twins train`")],
    cohort: Annotated[Path, typer.Option(help="patients CSV: the covariates the model needs (outcome and treatment "
                                                "columns, when present, give the real comparison)")],
    twins: Annotated[int, typer.Option(help="twins per patient per arm")] = 20,
    arms: Annotated[str | None, typer.Option(help="reference,comparator (default control,treatment)")] = None,
    subgroups: Annotated[str | None, typer.Option(help="comma-separated columns to estimate the effect within")] = None,
    events: Annotated[Path | None, typer.Option(help="long events CSV: patient_id,time,code,value,unit")] = None,
    source: Annotated[str, typer.Option(help="auto, predictor (ensemble) or generator (gated twin trajectories)")] = "auto",
    bootstrap: Annotated[int, typer.Option(help="bootstrap replicates over patients and ensemble members")] = 200,
    alpha: Alpha = 0.05,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    report: Report = None,
    as_json: AsJson = False,
) -> None:
    """Run every cohort patient's twins under both arms and estimate the treatment effect, overall and per subgroup.

    Example: evoclone trial simulate --model ./model --cohort cohort.csv --twins 20 --subgroups sex,stage --report trial.html
    """
    from .main import err
    from .trial_jobs import SimulateOptions
    from .trial_jobs import simulate as run_simulate

    opts = SimulateOptions(model_dir=model, cohort=cohort, events=events, twins=twins, arms=_split(arms) or None,
                           subgroups=_split(subgroups), source=source, bootstrap=bootstrap, alpha=alpha, seed=seed)
    with StageBars() as bars:
        doc, data = _run(run_simulate, opts, on_progress=bars)
    if report is not None:
        from .trial_report import simulate_report

        _run(simulate_report, doc, twins=data["twins"], real=data["real"], path=report)
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
        return
    e = doc["effect"]
    t = Table("group", "patients", e["measure"].replace("_", " "), title=f"In-silico trial: {doc['comparison']}")
    t.add_row("overall", str(doc["patients"]), _ci(e))
    for s in doc["subgroups"]:
        t.add_row(f"{s['column']} = {s['value']}", str(s["n"]), _ci(s) if s["estimate"] is not None else s["note"])
    if doc.get("real"):
        t.add_row("observed (real arms)", str(sum(a["n"] for a in doc["real"]["arms"].values())), _ci(doc["real"]["effect"]))
    err.print(t)
    err.print(f"{doc['twins_per_patient']} twins per patient per arm from the {doc['source']}; "
              f"{doc['rejected_by_quality_gate']} rejected by the quality gate; {doc['model_uncertainty']}"
              + (f"; report: {report}" if report else ""))


@analyze_app.command()
def procova(
    history: Annotated[Path, typer.Option(help="historical patients CSV the prognostic model trains on")],
    trial: Annotated[Path, typer.Option(help="the randomized trial's patients CSV")],
    treatment: Annotated[str, typer.Option(help="treatment column of the trial (two arms)")],
    time: Annotated[str | None, typer.Option(help="time-to-event column (days)")] = None,
    event: Annotated[str | None, typer.Option(help="event indicator column (1 event, 0 censored)")] = None,
    binary: Annotated[str | None, typer.Option(help="binary endpoint column (0/1)")] = None,
    continuous: Annotated[str | None, typer.Option(help="continuous endpoint column")] = None,
    covariates: Annotated[str | None, typer.Option(help="comma-separated covariates (default: every other "
                                                        "history column)")] = None,
    site_column: Annotated[str | None, typer.Option(help="history column naming each row's hospital: train the "
                                                         "prognostic model federated across them")] = None,
    epsilon: Annotated[float | None, typer.Option(help="DP budget of the prognostic model (federated: default 3)")] = None,
    delta: Annotated[float, typer.Option(help="DP delta")] = 1e-5,
    alpha: Alpha = 0.05,
    rounds: Annotated[int, typer.Option(help="federated rounds (with --site-column)")] = 5,
    engine: Annotated[str, typer.Option(help="simulation or deployment (with --site-column)")] = "simulation",
    epochs: Annotated[int, typer.Option(help="training epochs (local training)")] = 30,
    members: Annotated[int, typer.Option(help="ensemble members (local training)")] = 5,
    model_out: Annotated[Path | None, typer.Option(help="keep the prognostic model in this directory")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    report: Report = None,
    as_json: AsJson = False,
) -> None:
    """Train a prognostic model on history, score the trial, and estimate the effect unadjusted and adjusted.

    Example: evoclone analyze procova --history history.csv --trial trial.csv --treatment arm --continuous adas_cog --report procova.html
    """
    from evoclone.federated.tabular import OutcomeColumns

    from .main import err, fail
    from .procova_jobs import ProcovaOptions
    from .procova_jobs import procova as run_procova

    try:
        outcome = OutcomeColumns(time=time, event=event, binary=binary, continuous=continuous)
    except ValueError as exc:
        raise fail(f"{exc} (--time/--event, --binary or --continuous)", 2) from None
    opts = ProcovaOptions(history=history, trial=trial, treatment=treatment, outcome=outcome,
                          covariates=_split(covariates) or None, site_column=site_column, epsilon=epsilon,
                          delta=delta, alpha=alpha, rounds=rounds, engine=engine, model_out=model_out, seed=seed,
                          epochs=epochs, members=members)
    with StageBars() as bars:
        doc, data = _run(run_procova, opts, on_progress=bars)
    if report is not None:
        from .procova_report import procova_report

        _run(procova_report, doc, arm=data["arm"], score=data["score"], y=data.get("y"), time=data.get("time"),
             event=data.get("event"), horizon=data["horizon"], curve=data["curve"], path=report)
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
        return
    t = Table("analysis", doc["unadjusted"]["measure"].replace("_", " "), "SE", "p", title="Prognostic covariate adjustment")
    for name in ("unadjusted", "adjusted"):
        e = doc[name]
        t.add_row(name, _ci(e), _num(e["se"]), _num(e["p_value"]))
    err.print(t)
    p = doc["prognostic"]
    err.print(f"prognostic score {p['metric']} {_num(p['value'])}; variance reduction {doc['variance_reduction']:.1%}, "
              f"sample size reduction {doc['sample_size_reduction']:.1%}; {doc['dropped_missing']} rows dropped for "
              "missing values" + (f"; report: {report}" if report else ""))


@analyze_app.command("sample-size")
def sample_size(
    effect: Annotated[float, typer.Option(help="expected treatment effect (difference in means)")],
    sd: Annotated[float, typer.Option(help="outcome standard deviation (1: --effect is standardized)")] = 1.0,
    r2: Annotated[float | None, typer.Option(help="expected R² of the prognostic score")] = None,
    correlation: Annotated[float | None, typer.Option(help="expected correlation of score and outcome "
                                                           "(instead of --r2)")] = None,
    power: Annotated[float, typer.Option(help="target power")] = 0.8,
    alpha: Alpha = 0.05,
    ratio: Annotated[float, typer.Option(help="allocation ratio treatment:control")] = 1.0,
    report: Report = None,
    as_json: AsJson = False,
) -> None:
    """Patients a continuous-endpoint trial needs with and without a prognostic score (Schuler et al. 2022).

    Example: evoclone analyze sample-size --effect 0.3 --r2 0.4 --power 0.8 --alpha 0.05
    """
    from evoclone.federated.sample_size import compare, curve

    from .main import err, fail

    if (r2 is None) == (correlation is None):
        raise fail("give exactly one of --r2 and --correlation", 2)
    if correlation is not None and not -1 < correlation < 1:
        raise fail(f"--correlation must be between -1 and 1 (exclusive), got {correlation}", 2)
    r2_value = r2 if r2 is not None else correlation ** 2
    try:
        doc = compare(effect=effect, sd=sd, r2=r2_value, power=power, alpha=alpha, ratio=ratio)
        points = curve(effect=effect, sd=sd, power=power, alpha=alpha, ratio=ratio)
    except ValueError as exc:
        raise fail(str(exc).splitlines()[0], 2) from None
    doc.update(effect=effect, sd=sd, power=power, alpha=alpha, ratio=ratio)
    if report is not None:
        from .procova_report import sample_size_report

        _run(sample_size_report, doc, curve=points, path=report)
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
        return
    t = Table("analysis", "total", "treatment", "control", "power", title=f"Sample size (R² {r2_value:.2f})")
    for name in ("unadjusted", "adjusted"):
        s = doc[name]
        t.add_row(name, str(s["n_total"]), str(s["n_treatment"]), str(s["n_control"]), f"{s['power']:.3f}")
    err.print(t)
    err.print(f"the prognostic score saves {doc['sample_size_reduction']:.1%} of the patients"
              + (f"; report: {report}" if report else ""))
