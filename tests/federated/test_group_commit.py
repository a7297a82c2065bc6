"""The group-commit writer both services' audit logs use: what queues while a batch is written goes in the
next batch, in order; stop writes what is queued; a later put starts a new thread."""

from __future__ import annotations

import threading

from evoclone.federated.stores.group_commit import GroupCommitWriter


def test_items_queued_during_a_write_share_the_next_batch_in_order():
    batches: list[list[int]] = []
    first_taken, release = threading.Event(), threading.Event()

    def write(batch: list[int]) -> None:
        batches.append(batch)
        first_taken.set()
        release.wait(10)

    writer = GroupCommitWriter(write, name="test-writer", max_batch=3)
    writer.put(0)
    assert first_taken.wait(10)
    for i in range(1, 6):
        writer.put(i)
    release.set()
    writer.stop(timeout=10)
    assert batches == [[0], [1, 2, 3], [4, 5]]


def test_stop_writes_what_is_queued_and_a_later_put_starts_again():
    seen: list[int] = []
    starts: list[int] = []
    writer = GroupCommitWriter(seen.extend, name="test-writer", max_batch=100, on_start=lambda: starts.append(1))
    for i in range(50):
        writer.put(i)
    writer.stop(timeout=10)
    assert seen == list(range(50))
    writer.put(50)
    writer.stop(timeout=10)
    assert seen == list(range(51)) and len(starts) == 2
