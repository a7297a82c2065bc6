"""Latency tuning of Flower's polling and backoff defaults in the site's own processes.

Flower 1.42 paces a SuperNode for large, slow federations: it polls the SuperLink every
3 s when idle, its SuperExec looks for new tasks every second, and a ClientApp or SuperNode
that asks for a message's objects before they have arrived backs off exponentially from
1 s (1, 2, 4 s ...). Each round then waits several seconds on timers, whatever the
training takes. The guarded SuperNode and the ClientApps it forks apply shorter timers:
an idle poll of `EVOCLONE_NODE_POLL_SECONDS` (default 0.5 s), a SuperExec poll of 0.2 s, and
backoffs starting at 0.1 s (still exponential, same caps). Load on the SuperLink grows
accordingly (two requests per second per idle site), which loopback and hospital-scale
federations carry easily. flwr is pinned; `tests/integration` exercises these processes.
"""

from __future__ import annotations

import os
import time

FAST_BACKOFF = 0.1


class _PollClock:
    """`time` for Flower's SuperNode loop with its idle waits capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def apply_backoffs() -> None:
    """Shorter first backoffs for HTTP retries and object pulls in this process (and its forks)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.retry import http_retry, retry_invoker

    kw = inflatable_utils.pull_objects.__kwdefaults__
    kw["initial_backoff"] = min(kw["initial_backoff"], FAST_BACKOFF)

    def exponential(base_delay: float = FAST_BACKOFF, multiplier: float = 2, max_delay=None):
        return retry_invoker.exponential(base_delay=FAST_BACKOFF, multiplier=multiplier, max_delay=max_delay)

    http_retry.exponential = exponential


def apply_supernode() -> None:
    """Everything for the SuperNode process (before Flower's SuperNode starts)."""
    from flwr.supernode import start_client_internal as sci

    sci.time = _PollClock(float(os.environ.get("EVOCLONE_NODE_POLL_SECONDS", "0.5")))
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # read by the SuperExec it starts
    apply_backoffs()
