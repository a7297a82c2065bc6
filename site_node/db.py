"""The site database's engines: every site process (API workers, CLI commands) opens the database here.

Besides the shared SQLite/PostgreSQL setup (`federated.stores.engine.make_engine`), a committed write to the
tables the API's request path reads on every request (users, API tokens, model versions) changes the site
directory's data version (`federated/stores/data_version.py`), so each API process can keep what it read from
them (`api/deps.py`) until any process of the site writes them again: a revoked token, a disabled user or
a newly promoted model is seen by the next request in every worker.
"""

from __future__ import annotations

import sqlalchemy as sa

from evoclone.federated.stores.data_version import tracked_engine
from evoclone.federated.stores.engine import make_engine

from .settings import SiteSettings

WATCHED = frozenset({"site_user", "site_api_token", "local_model"})


def _watched(table: str | None) -> bool:
    return table is None or table in WATCHED  # a write to a table it cannot name counts


def site_engine(settings: SiteSettings) -> sa.Engine:
    """An engine for the site's database whose writes to users, tokens and models change the data version."""
    return tracked_engine(make_engine(settings.db_url), settings.site_dir, _watched,
                          limit_setting="request_memo_seconds")
