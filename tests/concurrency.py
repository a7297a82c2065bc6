"""Helpers for tests of what several processes or threads do at the same moment."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from evoclone.federated.stores.engine import make_engine


def run_at_once(fn: Callable[..., Any], calls: list[tuple], *, timeout: float = 60) -> tuple[list, list[BaseException]]:
    """Call fn(*args) for each args on its own thread, all started before any is waited for:
    (the results, in the order they came, and the exceptions raised)."""
    results: list = []
    errors: list[BaseException] = []

    def one(*args: Any) -> None:
        try:
            results.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 (handed to the test)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=args) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results, errors


@contextmanager
def upgraded_at_once(db_url: str, upgrade: Callable[[sa.Engine], Any], *, n: int = 4
                     ) -> Iterator[tuple[list[sa.Engine], list, list[BaseException]]]:
    """`n` engines on `db_url` (as `n` processes starting together) that each ran `upgrade` at the same moment:
    (engines, results, errors); the engines are disposed afterwards."""
    engines = [make_engine(db_url) for _ in range(n)]
    try:
        results, errors = run_at_once(upgrade, [(e,) for e in engines])
        yield engines, results, errors
    finally:
        for e in engines:
            e.dispose()
