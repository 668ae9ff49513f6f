"""Dynamic batching (triggers/serving/batching.py) without a model: what runs together, and how many at once."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from triggers.serving.batching import DynamicBatcher


def test_batches_run_side_by_side_one_per_inference_thread() -> None:
    """Two batches in flight at once (each waits for the other at a barrier: one at a time would time out there),
    never a third; requests that come while both run form the next batch together; each gets its own rows."""
    barrier = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    running, most = [0], [0]
    sizes: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            sizes.append(len(batch))
        try:
            if len(sizes) <= 2:
                barrier.wait()   # the first two batches: only met if both run at once
        finally:
            with lock:
                running[0] -= 1
        return batch * 2

    async def fire() -> list[np.ndarray]:
        batcher = DynamicBatcher(run, max_batch=64, max_delay_ms=0, concurrency=2)
        first = []
        for i in range(2):   # one at a time, each taken by a free thread at once
            first.append(asyncio.ensure_future(batcher.infer(np.full((1, 3), i, dtype=np.float32))))
            await asyncio.sleep(0.02)
        # both running, both threads taken: the next six queue, and go together once a thread is free
        rest = [asyncio.ensure_future(batcher.infer(np.full((1, 3), i, dtype=np.float32))) for i in range(2, 8)]
        answers = await asyncio.gather(*first, *rest)
        batcher.close()
        return answers

    answers = asyncio.run(fire())
    assert [float(a[0, 0]) for a in answers] == [2.0 * i for i in range(8)]
    assert most[0] == 2, most
    assert sizes == [1, 1, 6], sizes


def test_one_batch_at_a_time_when_concurrency_is_one() -> None:
    lock = threading.Lock()
    running, most = [0], [0]

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.01)
        with lock:
            running[0] -= 1
        return batch

    async def fire() -> None:
        batcher = DynamicBatcher(run, max_batch=2, max_delay_ms=0, concurrency=1)
        await asyncio.gather(*(batcher.infer(np.zeros((1, 1))) for _ in range(10)))

    asyncio.run(fire())
    assert most[0] == 1


def test_a_failing_batch_fails_its_requests_and_frees_its_thread() -> None:
    """The slot of a batch that raised is given back: later requests still run."""
    calls = [0]

    def run(batch: np.ndarray) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("the model broke")
        return batch + 1

    async def fire() -> tuple[BaseException | np.ndarray, ...]:
        batcher = DynamicBatcher(run, max_batch=8, max_delay_ms=0, concurrency=1)
        failed = await asyncio.gather(batcher.infer(np.zeros((1, 1))), return_exceptions=True)
        later = [await batcher.infer(np.zeros((1, 1))) for _ in range(3)]
        return (*failed, *later)

    first, *later = asyncio.run(fire())
    assert isinstance(first, RuntimeError) and [float(x[0, 0]) for x in later] == [1.0, 1.0, 1.0]


def test_a_lone_request_waits_out_the_delay_for_company_a_full_batch_does_not_and_close_sends_what_waits() -> None:
    """With a delay and a free thread, a lone request waits for company up to the delay, and those that come
    meanwhile join it; a full batch goes at once; a batcher no longer served sends what waits at once."""
    sizes: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch

    async def fire() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        batcher = DynamicBatcher(run, max_batch=4, max_delay_ms=300, concurrency=2)
        started = loop.time()
        first = asyncio.ensure_future(batcher.infer(np.zeros((1, 1))))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.infer(np.ones((1, 1))))
        await asyncio.gather(first, second)
        waited = loop.time() - started   # ~0.3 s: the first one's delay
        full = await asyncio.wait_for(batcher.infer(np.zeros((4, 1))), 5)   # max_batch: no waiting
        assert len(full) == 4
        slow = DynamicBatcher(run, max_batch=4, max_delay_ms=60_000, concurrency=1)
        pending = asyncio.ensure_future(slow.infer(np.zeros((2, 1))))
        await asyncio.sleep(0.05)
        assert not pending.done()
        closed = loop.time()
        slow.close()
        await asyncio.wait_for(pending, 5)
        return waited, loop.time() - closed

    waited, after_close = asyncio.run(fire())
    assert sizes == [2, 4, 2], sizes
    assert 0.29 <= waited < 5 and after_close < 5, (waited, after_close)
