"""Shorter retry backoffs for Flower's object pulls and HTTP retries, in every process of a run.

Flower 1.42 sends a message as an object tree: the receiver pulls the message, then its
objects, and an object that has not arrived yet (the sender is still pushing it) is retried
after 1 s, 2 s, 4 s ... (capped at 10 s). On a round that takes a few seconds this adds a
second or more at both ends: when a ClientApp pulls the round's model and when the ServerApp
pulls the sites' replies. Here retries start at `FAST_BACKOFF` and double up to
`BACKOFF_CAP`: a retry is one small request, and the sender is usually a few milliseconds
from done. The site's SuperNode, its ClientApp zygote (hence every ClientApp) and the
ServerApp call `apply_backoffs()` at start. flwr is pinned; `tests/integration` runs these
processes and `tests/site_node/test_flower_tuning.py` checks the patched defaults.
"""

from __future__ import annotations

FAST_BACKOFF = 0.1  # seconds before the first retry
BACKOFF_CAP = 0.5  # seconds between retries at most (Flower: 10 s for object pulls)


def apply_backoffs() -> None:
    """Patch this process's Flower: object pulls and HTTP retries back off from 0.1 s, up to 0.5 s for pulls."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.retry import http_retry, retry_invoker

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        kw = fn.__kwdefaults__
        kw["initial_backoff"] = min(kw["initial_backoff"], FAST_BACKOFF)
        kw["backoff_cap"] = min(kw["backoff_cap"], BACKOFF_CAP)

    def exponential(base_delay: float = FAST_BACKOFF, multiplier: float = 2, max_delay=None):
        return retry_invoker.exponential(base_delay=FAST_BACKOFF, multiplier=multiplier, max_delay=max_delay)

    http_retry.exponential = exponential
