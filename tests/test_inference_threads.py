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
    burst = [pool.submit(lambda: (gate.wait(5), threading.current_thread().name)[1]) for _ in range(4)]
    gate.set()
    assert len({f.result(5) for f in burst}) == 4   # the burst needed four threads
    assert wait_for(lambda: len(pool._idle) == 4, 5)   # all four idle again
    lone = {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(50)}
    assert len(lone) == 1, lone


def test_calls_beyond_the_threads_wait_in_order_and_errors_reach_the_caller() -> None:
    pool = WarmThreads(max_workers=1, name="test")
    gate, order = threading.Event(), []
    first = pool.submit(gate.wait, 5)
    queued = [pool.submit(order.append, i) for i in range(5)]
    failing = pool.submit(lambda: 1 / 0)
    cancelled = pool.submit(order.append, "cancelled")
    assert cancelled.cancel()
    after = pool.submit(lambda x, y=0: x + y, 1, y=2)   # keyword arguments too
    gate.set()
    assert first.result(5) is True
    assert [f.result(5) for f in queued] == [None] * 5 and order == [0, 1, 2, 3, 4]
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert after.result(5) == 3   # the thread went on after the error and skipped the cancelled call


def test_off_loop_runs_on_an_inference_thread() -> None:
    async def main() -> str:
        return await off_loop(lambda: threading.current_thread().name)

    assert asyncio.run(main()).startswith("inference_")


def test_an_awaited_call_gives_its_result_or_its_error_and_a_cancelled_one_never_runs() -> None:
    pool = WarmThreads(max_workers=1, name="test")
    gate, ran = threading.Event(), []

    async def main() -> None:
        busy = pool.awaitable(gate.wait, 5)   # the one thread is held: what follows waits in the backlog
        waiting = pool.awaitable(ran.append, "cancelled")
        waiting.cancel()                      # its caller gave up before a thread took it
        failing = pool.awaitable(lambda: 1 / 0)
        after = pool.awaitable(lambda x, y: x * y, 6, 7)
        gate.set()
        assert await busy is True
        with pytest.raises(ZeroDivisionError):
            await failing
        assert await after == 42
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert ran == []   # the cancelled call was skipped, and the thread went on


def test_a_call_that_ends_after_its_loop_closed_does_not_break_the_thread() -> None:
    pool = WarmThreads(max_workers=1, name="test")
    gate = threading.Event()

    async def leave_early() -> None:
        pool.awaitable(gate.wait, 5)   # nobody awaits it; the loop closes while the call runs

    asyncio.run(leave_early())
    gate.set()
    assert pool.submit(lambda: "still here").result(5) == "still here"
