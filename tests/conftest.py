"""Shared fixtures: small simulated cohorts and initialised site directories."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Modules with slow end-to-end tests first: `make test` hands whole modules to its workers in this order,
    and the longest ones (deployment, federated runs) starting last would leave one worker idle at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


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


PG = "postgresql+psycopg://postgres@127.0.0.1:5432"  # the machine's server (.ci/run starts it)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database: a SQLite file, then a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'site.db'}"
        return
    name = f"evoclone_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
