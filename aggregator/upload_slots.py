"""Limits on what the aggregator reads at once: upload slots, and per-identity concurrency.

`UploadSlots` bounds the uploads (updates, decoders) read and decoded at once
(`aggregator serve --max-concurrent-uploads`), so memory grows with that bound, not with the number
of collaborators: a stream waiting for a slot has not been read, and gRPC holds at most one
flow-control window of it. Waiting costs no thread (the server is asyncio); an upload that waits
longer than `wait_s` is refused with RESOURCE_EXHAUSTED and the collaborator retries it.

`IdentityLimits` bounds what one authenticated identity may hold open at once: a few long polls and
one upload stream, so one peer cannot take the server's capacity with many streams of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator

from fedsqueeze.errors import ResourceExhausted, Unavailable
from fedsqueeze.metrics import Metrics

DEFAULT_MAX_CONCURRENT_UPLOADS = 8
DEFAULT_UPLOAD_WAIT_S = 30.0
MAX_POLLS_PER_IDENTITY = 4
MAX_UPLOADS_PER_IDENTITY = 1


class UploadSlots:
    """At most `limit` uploads are read and decoded at once; the others wait (asyncio, no thread) for a slot."""

    def __init__(self, limit: int, metrics: Metrics, wait_s: float = DEFAULT_UPLOAD_WAIT_S) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1, got {limit}")
        self.limit = limit
        self.wait_s = wait_s
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self.peak = 0  # the most uploads ever in flight at once (tests check the bound with it)
        self._free: asyncio.Condition | None = None  # made on first use, inside the server's event loop

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._free is None:
            self._free = asyncio.Condition()
        async with self._free:
            if self.active >= self.limit:
                self.waiting += 1
                self.metrics.uploads_waiting.set(self.waiting)
                try:
                    async with asyncio.timeout(self.wait_s):
                        await self._free.wait_for(lambda: self.active < self.limit)
                except TimeoutError:
                    self.metrics.uploads_deferred.labels("refused").inc()
                    raise ResourceExhausted(
                        f"all {self.limit} upload slots stayed busy for {self.wait_s:g} s; retry later"
                    ) from None
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
            async with self._free:
                self.active -= 1
                self.metrics.uploads_in_flight.set(self.active)
                self._free.notify()


class IdentityLimits:
    """Per authenticated identity: at most `polls` long polls and `uploads` upload streams at once."""

    def __init__(self, polls: int = MAX_POLLS_PER_IDENTITY, uploads: int = MAX_UPLOADS_PER_IDENTITY) -> None:
        self.polls, self.uploads = polls, uploads
        self._polls: Counter[str] = Counter()
        self._uploads: Counter[str] = Counter()

    @contextlib.contextmanager
    def poll(self, member_id: str) -> Iterator[None]:
        if self._polls[member_id] >= self.polls:
            raise ResourceExhausted(
                f"{member_id} already has {self.polls} GetTask calls open; wait for one to answer"
            )
        with _held(self._polls, member_id):
            yield

    @contextlib.contextmanager
    def upload(self, member_id: str) -> Iterator[None]:
        if self._uploads[member_id] >= self.uploads:
            raise Unavailable(f"an upload from {member_id} is already being received; retry once it is done")
        with _held(self._uploads, member_id):
            yield


@contextlib.contextmanager
def _held(counts: Counter[str], key: str) -> Iterator[None]:
    counts[key] += 1
    try:
        yield
    finally:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]
