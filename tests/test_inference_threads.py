"""The inference threads (triggers/serving/inference_threads.py): the last thread to finish takes the next call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.conftest import wait_for
from triggers.serving.inference_threads import WarmThreads, off_loop


def test_a_lone_stream_of_calls_stays_on_one_thread_after_a_burst_started_others() -> None:
    pool = WarmThreads(max_workers=4, name="test")
    gate = threading.Event()

    async def main() -> tuple[set[str], set[str]]:
        burst = [pool.awaitable(lambda: (gate.wait(5), threading.current_thread().name)[1]) for _ in range(4)]
        gate.set()
        names = set(await asyncio.gather(*burst))
        assert wait_for(lambda: len(pool._idle) == 4, 5)   # all four idle again
        lone = {await pool.awaitable(lambda: threading.current_thread().name) for _ in range(50)}
        return names, lone

    burst, lone = asyncio.run(main())
    assert len(burst) == 4   # the burst needed four threads
    assert len(lone) == 1, lone


def test_calls_beyond_the_threads_wait_in_order_and_errors_reach_the_caller() -> None:
    """And a call whose caller was cancelled before a thread took it never runs; the thread goes on."""
    pool = WarmThreads(max_workers=1, name="test")
    gate, order = threading.Event(), []

    async def main() -> None:
        first = pool.awaitable(gate.wait, 5)   # the one thread is held: what follows waits in the backlog
        queued = [pool.awaitable(order.append, i) for i in range(5)]
        failing = pool.awaitable(lambda: 1 / 0)
        cancelled = pool.awaitable(order.append, "cancelled")
        cancelled.cancel()
        after = pool.awaitable(lambda x, y: x * y, 6, 7)
        gate.set()
        assert await first is True
        assert await asyncio.gather(*queued) == [None] * 5
        with pytest.raises(ZeroDivisionError):
            await failing
        assert await after == 42   # the thread went on after the error and skipped the cancelled call
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    asyncio.run(main())
    assert order == [0, 1, 2, 3, 4]


def test_off_loop_runs_on_an_inference_thread() -> None:
    async def main() -> str:
        return await off_loop(lambda: threading.current_thread().name)

    assert asyncio.run(main()).startswith("inference_")


def test_a_call_that_ends_after_its_loop_closed_does_not_break_the_thread() -> None:
    pool = WarmThreads(max_workers=1, name="test")
    gate = threading.Event()

    async def leave_early() -> None:
        pool.awaitable(gate.wait, 5)   # nobody awaits it; the loop closes while the call runs

    asyncio.run(leave_early())
    gate.set()

    async def later() -> str:
        return await pool.awaitable(lambda: "still here")

    assert asyncio.run(later()) == "still here"   # the same thread, once it let the closed loop's answer go
