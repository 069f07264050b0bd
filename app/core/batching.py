"""Read coalescing on the event loop: concurrent reads by key share one statement (the DataLoader pattern).

A hot read (the polled job) costs one database round trip per request, and on a small machine that round trip
(a send, a wake-up, a receive, the driver's bookkeeping) costs more CPU than the rest of the request. A
statement is sent at the end of the event loop's turn in which its first request asked (the requests that
arrived together run in that turn, and share it); while `max_in_flight` statements are outstanding, further
requests wait for the next statement, which reads every key asked for in the meantime (`WHERE id = ANY(...)`,
each key once). Under light load nothing waits: a lone request's statement goes out in the same turn. Under
load the statements carry several keys and the round trips per request fall with the concurrency.

Every answer is read by a statement that started after its request arrived, so nothing is served from
memory and no write that committed before the request can be missed: the database stays the source of
truth. A statement that fails fails every request it carried (with the same error, e.g. the 503 of a lost
database).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class KeyedBatcher(Generic[K, V]):
    """`await batcher.get(key)`: the value `fetch` returns for `key` (None when it returns none).

    `fetch(keys)` reads all of `keys` in one statement and returns a mapping of those it found. One batcher
    per event loop (it holds futures of that loop); `max_batch` keys per statement at most.
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[K]], Awaitable[dict[K, V]]],
        *,
        max_in_flight: int = 1,
        max_batch: int = 100,
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._fetch = fetch
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._in_flight = 0
        self._scheduled = False
        # Statements sent, and the keys they carried (how much coalescing happens: tests read them).
        self.statements = 0
        self.keys_read = 0

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._in_flight < self._max_in_flight and not self._scheduled:
            # Sent at the end of this turn of the loop: the requests whose bytes arrived together (and so
            # run in this same turn) share it, for no wait at all.
            self._scheduled = True
            loop.call_soon(self._start_scheduled)
        return await future

    def _start_scheduled(self) -> None:
        self._scheduled = False
        while self._waiting and self._in_flight < self._max_in_flight:
            self._start()

    def _start(self) -> None:
        keys = list(itertools.islice(self._waiting, self._max_batch))  # the oldest waiting first
        batch = {key: self._waiting.pop(key) for key in keys}
        self._in_flight += 1
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            self.statements += 1
            self.keys_read += len(batch)
            try:
                found = await self._fetch(list(batch))
            except BaseException as exc:  # every request it carried gets the error
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for key, futures in batch.items():
                value = found.get(key)
                for future in futures:
                    if not future.done():  # a request cancelled meanwhile (client gone)
                        future.set_result(value)
        finally:
            self._in_flight -= 1
            if self._waiting:
                self._start()
