"""The inference threads: a call goes to the thread that finished last.

ONNX Runtime and torch release the GIL while they compute, so concurrent requests run side by side on these
threads, one per core. A `ThreadPoolExecutor` wakes whichever idle thread the OS picks, so once a burst has
started a second thread, a lone stream of requests alternates between threads (and cores) and each call
starts with cold caches: at batch 32 on the Fashion-MNIST ResNet the session took 8.5 ms instead of 7.9 ms
(benchmarks/serving_peers.py). Here the most recently idle thread takes the next call (last in, first out),
so one request at a time always runs on the same warm thread, as a plain loop over the session would.

`off_loop` hands the event loop its answer directly (an asyncio future settled by `call_soon_threadsafe`), not
through a `concurrent.futures.Future` chained to an asyncio one: the chain's locks, condition and two callbacks
per call showed in a profile of the inference threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from automation.threads import policy

_Call = tuple[asyncio.Future, Callable[..., Any], tuple[Any, ...]]   # the caller's future, what to run, with what


class WarmThreads:
    """At most `max_workers` daemon threads, started as calls need them; calls beyond them wait in order."""

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers, self.name = max_workers, name
        self._lock = threading.Lock()
        self._idle: list[SimpleQueue[_Call]] = []     # a stack: the last to finish is the first to go again
        self._backlog: deque[_Call] = deque()
        self._started = 0

    def awaitable(self, fn: Callable[..., Any], /, *args: Any) -> asyncio.Future:
        """`fn(*args)` on a thread, as a future of the running event loop, settled there by `call_soon_threadsafe`.
        A call whose caller was cancelled before a thread took it is not run."""
        future = asyncio.get_running_loop().create_future()
        call: _Call = (future, fn, args)
        with self._lock:
            if self._idle:
                self._idle.pop().put(call)
                return future
            if self._started >= self.max_workers:
                self._backlog.append(call)
                return future
            self._started += 1
            number = self._started
        inbox: SimpleQueue[_Call] = SimpleQueue()
        inbox.put(call)
        try:
            threading.Thread(target=self._work, args=(inbox,), name=f"{self.name}_{number}", daemon=True).start()
        except RuntimeError:   # no thread to be had: the slot is free again, and the caller hears of it
            with self._lock:
                self._started -= 1
            raise
        return future

    def _work(self, inbox: SimpleQueue[_Call]) -> None:
        call = inbox.get()
        while True:
            future, fn, args = call
            if future.cancelled():
                result = error = None
            else:
                try:
                    result, error = fn(*args), None
                except BaseException as exc:   # the caller hears of it; the thread goes on
                    result, error = None, exc
            # idle again before the caller hears: its next call finds this thread, still warm, on top of the stack
            with self._lock:
                following = self._backlog.popleft() if self._backlog else None
                if following is None:
                    self._idle.append(inbox)
            if not future.cancelled():
                try:
                    future.get_loop().call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:   # the loop closed meanwhile: nobody waits for the answer
                    pass
            del future, fn, args, call, result, error
            call = following if following is not None else inbox.get()


# one per core (each ONNX session runs on one intra-op thread); a plain executor hop costs less than anyio's
# thread pool, and at batch 1 the hop is most of a request's time
INFERENCE = WarmThreads(max_workers=policy().serve_workers, name="inference")   # one per usable CPU (cgroup aware)


def off_loop(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn(*args)` on an inference thread, so the event loop keeps accepting requests: await the future for
    its result. Parsing a large body goes there too: the thread that parses it then runs the model on it, its
    rows still in cache."""
    return INFERENCE.awaitable(fn, *args)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
