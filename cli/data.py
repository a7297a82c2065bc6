"""`evoclone data ...`: simulated cohorts for demos, tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Simulated multi-site cohorts with a known ground truth.")


@data_app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="output directory (one folder per site)")],
    patients: Annotated[int, typer.Option(help="patients over all sites")] = 600,
    sites: Annotated[int, typer.Option(help="number of hospitals")] = 3,
    seed: Annotated[int, typer.Option(help="random seed; the same seed gives the same files")] = 0,
    force: Annotated[bool, typer.Option(help="write into a non-empty directory")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout")] = False,
) -> None:
    """Write OUT/<site>/patients.csv, OUT/<site>/events.csv and OUT/ground_truth.json.

    Example: evoclone data simulate --patients 600 --sites 3 --seed 7 --out ./cohort
    """
    from evoclone.federated.simulator import simulate_cohort, write_cohort

    from .main import fail

    if sites < 1:
        raise fail(f"--sites must be at least 1, got {sites}", 2)
    if patients < sites:
        raise fail(f"--patients must be at least the number of sites ({sites}), got {patients}", 2)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise fail(f"--out {out} exists and is not an empty directory; pass --force or choose another path", 2)
    try:
        cohort = simulate_cohort(patients=patients, sites=sites, seed=seed)
        write_cohort(cohort, out)
    except OSError as exc:
        raise fail(f"cannot write to {out}: {exc.strerror}; choose a writable --out", 2) from None
    summary = {"out": str(out), "seed": seed,
               "sites": [{"name": s["name"], "patients": s["patients"], "timeline_events": s["timeline_events"],
                          "events_observed": s["events_observed"]} for s in cohort.truth["sites"]]}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Simulated cohort (seed {seed}) in {out}")
        for col in ("site", "patients", "timeline events", "outcome events"):
            t.add_column(col, justify="right")
        for s in summary["sites"]:
            t.add_row(s["name"], str(s["patients"]), str(s["timeline_events"]), str(s["events_observed"]))
        Console(stderr=True).print(t)
