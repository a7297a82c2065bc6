"""The sponsor's commands against the coordinator's API: `evoclone login`, `study ...`, `round ...`."""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

study_app = typer.Typer(no_args_is_help=True, help="Studies on the coordinator: create, list, show, activate.")
round_app = typer.Typer(no_args_is_help=True, help="Federated runs of a study: launch, status, stop.")
err = Console(stderr=True)
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
TERMINAL = ("finished", "failed", "stopped")


def _split(v: str | None) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()] if v else []


def call(method: str, path: str, *, need_token: bool = True, **kw) -> dict | list:
    """One API call with the configured coordinator and token; errors exit with their one-line message."""
    from .client import ClientError, Coordinator

    try:
        return Coordinator.from_env(need_token=need_token).request(method, path, **kw)
    except ClientError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.code) from None


def login(
    url: Annotated[str, typer.Option(help="coordinator base URL, e.g. https://coordinator.example.org:8443")],
    username: Annotated[str, typer.Option(help="your coordinator user")],
    ca: Annotated[str | None, typer.Option(help="CA certificate (PEM) the coordinator's TLS certificate chains to")] = None,
    password_stdin: Annotated[bool, typer.Option(help="read the password from stdin")] = False,
) -> None:
    """Log in to the coordinator and keep the tokens (mode 0600) for the study, round and model commands.

    Example: evoclone login --url https://coordinator:8443 --username alice --ca study-ca.pem
    """
    from .client import ClientError, Coordinator, save_config

    password = sys.stdin.readline().rstrip("\n") if password_stdin else getpass.getpass("password: ")
    try:
        pair = Coordinator(url=url.rstrip("/"), ca=ca, access=None, refresh=None).login(username, password)
    except ClientError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        raise typer.Exit(exc.code) from None
    path = save_config({"url": url.rstrip("/"), "ca": ca, "username": username,
                        "access_token": pair["access_token"], "refresh_token": pair["refresh_token"]})
    err.print(f"logged in as {username}; tokens kept in {path}")


def _site_ids(names: list[str]) -> list[int]:
    sites = {s["name"]: s for s in call("GET", "/api/v1/sites")}
    missing = [n for n in names if n not in sites]
    if missing:
        err.print(f"[bold red]error:[/bold red] unknown sites {missing}; known: {', '.join(sorted(sites)) or 'none'}")
        raise typer.Exit(2)
    return [sites[n]["id"] for n in names]


@study_app.command("create")
def study_create(
    name: Annotated[str, typer.Option(help="study name (unique)")],
    indication: Annotated[str, typer.Option(help="indication, e.g. 'node-positive breast cancer'")],
    phase: Annotated[str, typer.Option(help="trial phase: I, II, III, IV, I/II, II/III")],
    arms: Annotated[str, typer.Option(help="the two arms, control first: control,treatment")],
    endpoints: Annotated[str, typer.Option(help="comma-separated endpoint names")],
    sites: Annotated[str, typer.Option(help="comma-separated names of the participating (active) sites")],
    epsilon: Annotated[float, typer.Option(help="target privacy budget per site")] = 3.0,
    delta: Annotated[float, typer.Option(help="target DP delta per site")] = 1e-5,
    inclusion: Annotated[list[str] | None, typer.Option(help="an inclusion criterion (repeatable)")] = None,
    as_json: AsJson = False,
) -> None:
    """Create a draft study over active sites.

    Example: evoclone study create --name gbsg --indication "breast cancer" --phase III --arms no,yes --endpoints rfs --sites north,south
    """
    body = {"name": name, "indication": indication, "phase": phase, "arms": _split(arms),
            "endpoints": _split(endpoints), "inclusion_criteria": inclusion or [], "target_epsilon": epsilon,
            "target_delta": delta, "site_ids": _site_ids(_split(sites))}
    study = call("POST", "/api/v1/studies", json=body)
    if as_json:
        typer.echo(json.dumps(study))
    else:
        err.print(f"study {study['id']} ({study['name']}) created as {study['status']}; "
                  f"activate it with `evoclone study activate {study['id']}`")


@study_app.command("list")
def study_list(as_json: AsJson = False) -> None:
    """Studies on the coordinator.

    Example: evoclone study list
    """
    studies = call("GET", "/api/v1/studies")
    if as_json:
        typer.echo(json.dumps(studies))
        return
    t = Table("id", "name", "phase", "status", "arms", "sites", "epsilon", title="Studies")
    for s in studies:
        t.add_row(str(s["id"]), s["name"], s["phase"], s["status"], " vs ".join(s["arms"]), str(len(s["site_ids"])),
                  f"{s['target_epsilon']:g}")
    err.print(t)


@study_app.command("show")
def study_show(study_id: Annotated[int, typer.Argument(help="study id")], as_json: AsJson = False) -> None:
    """One study with its runs.

    Example: evoclone study show 1
    """
    study = call("GET", f"/api/v1/studies/{study_id}")
    runs = call("GET", "/api/v1/runs", params={"study": study_id})["runs"]
    if as_json:
        typer.echo(json.dumps({**study, "runs": runs}))
        return
    err.print(f"[bold]{study['name']}[/bold] ({study['status']}): {study['indication']}, phase {study['phase']}; "
              f"arms {' vs '.join(study['arms'])}; endpoints {', '.join(study['endpoints'])}; "
              f"epsilon {study['target_epsilon']:g}, delta {study['target_delta']:g}; sites {study['site_ids']}")
    _runs_table(runs)


@study_app.command("activate")
def study_activate(study_id: Annotated[int, typer.Argument(help="study id")],
                   status: Annotated[str, typer.Option(help="new status: active, paused or closed")] = "active") -> None:
    """Change a study's status (runs can only be launched on an active study).

    Example: evoclone study activate 1
    """
    study = call("PATCH", f"/api/v1/studies/{study_id}", json={"status": status})
    err.print(f"study {study['id']} is {study['status']}")


def _runs_table(runs: list[dict]) -> None:
    t = Table("run", "status", "rounds", "started", "finished", "by", title="Runs")
    for r in runs:
        t.add_row(str(r["id"]), r["status"], str(r["rounds"]), str(r.get("started_at") or ""),
                  str(r.get("finished_at") or ""), r.get("created_by", ""))
    err.print(t)


@round_app.command("launch")
def round_launch(
    study: Annotated[int, typer.Option(help="study id")],
    covariates: Annotated[str, typer.Option(help="comma-separated covariates every site's snapshot holds")],
    endpoint: Annotated[str, typer.Option(help="time_to_event, binary or continuous")] = "time_to_event",
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 5,
    model: Annotated[str, typer.Option(help="fusion or gpt")] = "fusion",
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam")] = "fedavg",
    local_epochs: Annotated[int, typer.Option(help="local epochs per round")] = 2,
    batch_size: Annotated[int, typer.Option(help="(expected) batch size")] = 32,
    lr: Annotated[float, typer.Option(help="local learning rate")] = 3e-3,
    min_sites: Annotated[int, typer.Option(help="sites that must train for a round to count (0: all)")] = 0,
    secure_aggregation: Annotated[bool, typer.Option(help="SecAgg+ rounds")] = False,
    follow: Annotated[bool, typer.Option(help="show progress until the run ends")] = False,
    as_json: AsJson = False,
) -> None:
    """Queue a federated DP training run of an active study (the study sets epsilon and delta).

    Example: evoclone round launch --study 1 --covariates age,pnodes,tsize --rounds 5 --follow
    """
    config = {"model": model, "endpoint": endpoint, "covariates": _split(covariates), "strategy": strategy,
              "local_epochs": local_epochs, "batch_size": batch_size, "learning_rate": lr, "min_sites": min_sites,
              "secure_aggregation": secure_aggregation}
    run = call("POST", f"/api/v1/studies/{study}/runs", json={"rounds": rounds, "config": config})
    if follow:
        run = _follow(run["id"])
    if as_json:
        typer.echo(json.dumps(run))
    else:
        err.print(f"run {run['id']} of study {study}: {run['status']}")


def _follow(run_id: int, poll: float = 2.0) -> dict:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        task = None
        while True:
            run = call("GET", f"/api/v1/runs/{run_id}")
            if task is None:
                task = progress.add_task(f"run {run_id}", total=run["rounds"])
            progress.update(task, completed=run["rounds_done"], description=f"run {run_id} ({run['status']})")
            if run["status"] in TERMINAL:
                return run
            time.sleep(poll)  # a remote run's progress: there is no local server to poll a health endpoint of


@round_app.command("status")
def round_status(run_id: Annotated[int, typer.Argument(help="run id")],
                 follow: Annotated[bool, typer.Option(help="show progress until the run ends")] = False,
                 as_json: AsJson = False) -> None:
    """A run's status and every round's aggregate and per-site figures (epsilon spent, losses, metrics).

    Example: evoclone round status 3
    """
    run = _follow(run_id) if follow else call("GET", f"/api/v1/runs/{run_id}")
    if as_json:
        typer.echo(json.dumps(run))
        return
    err.print(f"run {run['id']} (study {run['study_id']}): {run['status']}, {run['rounds_done']}/{run['rounds']} rounds")
    t = Table("round", "sites trained", "train loss", "validation metric", "max epsilon", title="Rounds")
    for r in run["history"]:
        eps = [s["epsilon"] for s in r["sites"] if s["epsilon"] is not None]
        trained = sum(1 for s in r["sites"] if s["metrics"].get("trained"))
        m = r["metrics"]
        t.add_row(str(r["round"]), f"{trained}/{len(r['sites'])}", f"{m.get('train_loss', float('nan')):.4f}",
                  f"{m.get('val_metric', float('nan')):.4f}", f"{max(eps):.3f}" if eps else "")
    err.print(t)


@round_app.command("stop")
def round_stop(run_id: Annotated[int, typer.Argument(help="run id")]) -> None:
    """Stop a queued or running run.

    Example: evoclone round stop 3
    """
    run = call("POST", f"/api/v1/runs/{run_id}/stop")
    err.print(f"run {run['id']}: {run['status']}" + (" (stopping at the SuperLink)" if run["status"] == "running" else ""))


model_app = typer.Typer(no_args_is_help=True, help="The model registry: versions, canary rollout, promote, rollback.")


@model_app.command("list")
def model_list(study: Annotated[int | None, typer.Option(help="only this study's versions")] = None,
               as_json: AsJson = False) -> None:
    """Registered model versions with their status and lineage.

    Example: evoclone model list --study 1
    """
    models = call("GET", "/api/v1/models", params={"study": study} if study is not None else None)
    if as_json:
        typer.echo(json.dumps(models))
        return
    t = Table("id", "status", "run", "sites", "max epsilon", "created", title="Model versions")
    for m in models:
        eps = [v for v in m["lineage"]["epsilon_per_site"].values() if v is not None]
        t.add_row(m["id"], m["status"], str(m["run_id"] or ""), ", ".join(m["lineage"]["sites"]),
                  f"{max(eps):.3f}" if eps else "", m["created_at"][:19])
    err.print(t)


@model_app.command("show")
def model_show(model_id: Annotated[str, typer.Argument(help="version id, e.g. s1-v2")], as_json: AsJson = False) -> None:
    """One version: lineage, signature, rollouts.

    Example: evoclone model show s1-v2
    """
    m = call("GET", f"/api/v1/models/{model_id}")
    if as_json:
        typer.echo(json.dumps(m))
        return
    lin = m["lineage"]
    err.print(f"[bold]{m['id']}[/bold] ({m['status']}) of study {m['study_id']}, run {m['run_id']}; components "
              f"{', '.join(f'{k}: {v}' for k, v in m['components'].items())}")
    err.print(f"sites {', '.join(lin['sites'])}; epsilon per site {lin['epsilon_per_site']}; delta {lin['delta']}")
    err.print(f"manifest sha256 {m['manifest_sha256']}; signed by {m.get('key_fingerprint', '')}")
    for r in m.get("rollouts", []):
        err.print(f"canary to {', '.join(r['sites'])} (margin {r['margin']}): {r.get('decision') or 'waiting for reports'}")


@model_app.command("canary")
def model_canary(model_id: Annotated[str, typer.Argument(help="version id")],
                 sites: Annotated[str, typer.Option(help="comma-separated canary sites")],
                 margin: Annotated[float | None, typer.Option(help="how much worse than the current version the "
                                                                 "candidate may be at a canary site")] = None) -> None:
    """Send a version to a few sites first; it is promoted or rolled back automatically on their reports.

    Example: evoclone model canary s1-v2 --sites north --margin 0.02
    """
    body = {"sites": _split(sites), **({"margin": margin} if margin is not None else {})}
    r = call("POST", f"/api/v1/models/{model_id}/canary", json=body)
    err.print(f"{model_id} is in canary at {', '.join(r['sites'])} (margin {r['margin']})")


@model_app.command("promote")
def model_promote(model_id: Annotated[str, typer.Argument(help="version id")]) -> None:
    """Promote a version to every site of its study now.

    Example: evoclone model promote s1-v2
    """
    m = call("POST", f"/api/v1/models/{model_id}/promote")
    err.print(f"{m['id']} is {m['status']}")


@model_app.command("rollback")
def model_rollback(model_id: Annotated[str, typer.Argument(help="version id")]) -> None:
    """Roll a version back (sites return to the version it replaced).

    Example: evoclone model rollback s1-v2
    """
    m = call("POST", f"/api/v1/models/{model_id}/rollback")
    err.print(f"{m['id']} is {m['status']}")
