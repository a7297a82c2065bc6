"""Shared fixtures: small simulated cohorts and initialised site directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """A 3-site, 240-patient simulated extract written to disk once per session."""
    from evoclone.federated.simulator import simulate_cohort, write_cohort

    out = tmp_path_factory.mktemp("cohort")
    cohort = simulate_cohort(patients=240, sites=3, seed=11)
    write_cohort(cohort, out)
    return cohort, out


@pytest.fixture
def site_dir(tmp_path) -> Path:
    """An initialised, empty site directory."""
    from evoclone.site_node.settings import init_site

    d = tmp_path / "site-a"
    init_site(d, name="site-a")
    return d
