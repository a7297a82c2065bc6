"""Group commit: one writer thread per process writes everything queued so far in one transaction.

Callers queue an item (which carries whatever they wait on, a future) and wait. The thread takes every
item queued so far (at most `max_batch`), hands the batch, in submission order, to the owner's `write`
callback, which writes it in one transaction and then settles the batch's waiters, failures included;
while it writes, the next batch queues up. The coordinator's audit trail and the site's access log both
use it: one commit (one fsync) per batch instead of per request, and each caller still answers only
after the commit that holds its item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class GroupCommitWriter:
    """One thread that hands queued items to `write` in batches; it starts on first use (and again after stop).

    `write(batch)` must settle every waiter of its batch itself and should not raise: an exception that
    escapes it ends the thread (the next `put` starts a new one). `on_start` runs before a thread starts,
    under the writer's lock (to open what the thread writes to).
    """

    def __init__(self, write: Callable[[list[Any]], None], *, name: str, max_batch: int,
                 on_start: Callable[[], None] | None = None) -> None:
        self.write, self.name, self.max_batch, self.on_start = write, name, max_batch, on_start
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        """Queue one item for the next batch, starting the thread when none runs."""
        # under the lock, so that an item is never queued behind the stop of a thread that is going away
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self.on_start is not None:
                    self.on_start()
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put(item)

    def stop(self, timeout: float) -> None:
        """Write what is queued, then stop the thread (waiting at most `timeout` seconds for it)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive():
                self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch, stop = [item], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self.write(batch)
            if stop:
                return
