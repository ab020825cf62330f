"""A bound on the uploads the aggregator reads and decodes at once (`aggregator serve --max-concurrent-uploads`)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from fedsqueeze.errors import ResourceExhausted, Unavailable
from fedsqueeze.metrics import Metrics

# Uploads read and decoded at once, and how long another may wait for a slot before it is refused
# with RESOURCE_EXHAUSTED (and retried).
DEFAULT_MAX_CONCURRENT_UPLOADS = 8
DEFAULT_UPLOAD_WAIT_S = 30.0


class UploadSlots:
    """At most `limit` uploads are read and decoded at once; the others wait for a slot.

    An upload that waits has not read its stream, so gRPC holds at most one flow-control window of
    it (see `server.grpc_options`). One that waits longer than `wait_s` is refused with
    RESOURCE_EXHAUSTED, and the collaborator retries it with backoff: a waiting upload holds a
    worker thread, which GetTask, Join and health checks also need. Waiting rather than refusing at
    once matters: refusing at once cut bench/scale.py's ingest at 1,000 collaborators from ~100 to
    12 updates/s, the retries queueing for worker threads behind the long polls.
    """

    def __init__(self, limit: int, metrics: Metrics, wait_s: float = DEFAULT_UPLOAD_WAIT_S) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1, got {limit}")
        self.limit = limit
        self.wait_s = wait_s
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self.peak = 0  # the most uploads ever in flight at once (tests check the bound with it)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, is_active: Callable[[], bool]) -> Iterator[None]:
        """Hold a slot for the body; wait up to `wait_s` while the RPC is alive (`is_active`) if none is free."""
        with self._cond:
            if self.active >= self.limit:
                self.waiting += 1
                self.metrics.uploads_waiting.set(self.waiting)
                deadline = time.monotonic() + self.wait_s
                try:
                    while self.active >= self.limit:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self.metrics.uploads_deferred.labels("refused").inc()
                            raise ResourceExhausted(f"all {self.limit} upload slots stayed busy for {self.wait_s:g} s; retry later")
                        if not is_active():
                            raise Unavailable("the upload ended while waiting for a slot")
                        self._cond.wait(min(remaining, 0.5))  # woken by notify; 0.5 s only to notice a cancelled RPC
                except BaseException:
                    if self.active < self.limit:
                        self._cond.notify()  # pass on a wake-up this waiter may have taken
                    raise
                finally:
                    self.waiting -= 1
                    self.metrics.uploads_waiting.set(self.waiting)
                self.metrics.uploads_deferred.labels("waited").inc()
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.metrics.uploads_in_flight.set(self.active)
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self.metrics.uploads_in_flight.set(self.active)
                self._cond.notify()
