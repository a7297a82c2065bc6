"""The site's Flower timers: the SuperNode's poll clock and the retry backoffs every process of a run applies."""

from __future__ import annotations

import pytest

from evoclone.site_node.flower_tuning import ACTIVE_POLL, LOCAL_WAIT, _PollClock


def test_poll_clock_polls_fast_while_a_message_is_handled_and_slows_down_when_idle(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("evoclone.site_node.flower_tuning.time.monotonic", lambda: now[0])
    clock = _PollClock(0.5, window=60.0)
    assert clock.wait_for(3) == 0.5  # idle: Flower's 3 s SuperLink poll runs at the configured idle pace
    assert clock.wait_for(0.5) == LOCAL_WAIT  # waiting for its ClientApp's reply: a look at local state
    now[0] += 10
    assert clock.wait_for(3) == ACTIVE_POLL  # a run is active here: the next round's message is picked up fast
    now[0] += 60
    assert clock.wait_for(3) == 0.5  # a minute without a message: idle again
    assert _PollClock(5.0).wait_for(3) == 3  # never longer than Flower asked for


def test_backoffs_start_at_a_tenth_of_a_second_and_stay_short(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.retry import http_retry

    from evoclone.federated.flower.backoff import BACKOFF_CAP, FAST_BACKOFF, apply_backoffs

    fns = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    for fn in fns:  # restored after the test: other tests in this process see Flower's own defaults
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))
    monkeypatch.setattr(http_retry, "exponential", http_retry.exponential)
    assert all(fn.__kwdefaults__["initial_backoff"] == 1 for fn in fns)  # Flower's: 1 s, 2 s, 4 s ... up to 10 s
    apply_backoffs()
    for fn in fns:
        assert fn.__kwdefaults__["initial_backoff"] == FAST_BACKOFF
        assert fn.__kwdefaults__["backoff_cap"] == BACKOFF_CAP
    first = next(http_retry.exponential())
    assert first == pytest.approx(FAST_BACKOFF)
