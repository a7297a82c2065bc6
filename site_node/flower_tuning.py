"""Latency tuning of Flower's polling and backoff defaults in the site's own processes.

Flower 1.42 paces a SuperNode for large, slow federations: it polls the SuperLink every
3 s when idle, waits in 0.5 s steps for its own ClientApp's reply, its SuperExec looks for
new tasks every second, and a ClientApp or SuperNode that asks for a message's objects
before they have arrived backs off exponentially from 1 s (1, 2, 4 s ...). Each round then
waits several seconds on timers, whatever the training takes. The guarded SuperNode and the
ClientApps it forks apply shorter timers:

- the SuperLink poll: `EVOCLONE_NODE_POLL_SECONDS` (default 0.5 s) when idle, and
  `EVOCLONE_NODE_ACTIVE_POLL_SECONDS` (default 0.1 s) for `ACTIVE_WINDOW` seconds after the
  node last handled a message, so the rounds of a run in progress start without waiting out
  an idle poll;
- local waits (the reply of its own ClientApp, an object not yet written): 0.02 s steps,
  which cost a look at the node's in-memory state, nothing on the network;
- a SuperExec poll of 0.1 s, and retries of object pulls and HTTP requests from 0.1 s
  (`federated.flower.backoff`, which the ServerApp applies too).

Load on the SuperLink grows accordingly (two requests per second per idle site, ten per
active one), which loopback and hospital-scale federations carry easily; a study with many
sites raises the active poll. flwr is pinned;
`tests/integration` exercises these processes.
"""

from __future__ import annotations

import os
import time

from evoclone.federated.flower.backoff import apply_backoffs

ACTIVE_POLL = 0.1  # seconds between SuperLink polls while a run is active at this node
ACTIVE_WINDOW = 60.0  # seconds after the last handled message during which the node counts as active
LOCAL_WAIT = 0.02  # seconds between looks at the node's own state for a reply or an object
_NETWORK_POLL = 3.0  # the only sleep of Flower's SuperNode loop that precedes a SuperLink request


class _PollClock:
    """`time` for Flower's SuperNode loop with its waits shortened.

    The loop sleeps 3 s after a poll of the SuperLink found no message and 0.5 s per look at
    its local state while its ClientApp works; a local wait means a message is being handled,
    which makes the node active for `ACTIVE_WINDOW` seconds.
    """

    def __init__(self, idle: float, *, active: float = ACTIVE_POLL, window: float = ACTIVE_WINDOW,
                 local: float = LOCAL_WAIT) -> None:
        self.idle, self.active, self.window, self.local = idle, active, window, local
        self.active_until = 0.0

    def __getattr__(self, name: str):
        return getattr(time, name)

    def wait_for(self, seconds: float) -> float:
        """How long this clock sleeps when Flower asks for `seconds`."""
        now = time.monotonic()
        if seconds < _NETWORK_POLL:
            self.active_until = now + self.window
            return min(seconds, self.local)
        return min(seconds, self.active if now < self.active_until else self.idle)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.wait_for(seconds))


def apply_supernode() -> None:
    """Everything for the SuperNode process (before Flower's SuperNode starts)."""
    from flwr.supernode import start_client_internal as sci

    sci.time = _PollClock(float(os.environ.get("EVOCLONE_NODE_POLL_SECONDS", "0.5")),
                          active=float(os.environ.get("EVOCLONE_NODE_ACTIVE_POLL_SECONDS", str(ACTIVE_POLL))))
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # read by the SuperExec it starts
    apply_backoffs()

