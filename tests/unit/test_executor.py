"""runner.executor.Executor: bounded lanes and how model failures become errors."""

from __future__ import annotations

import asyncio
import threading
from contextlib import AsyncExitStack

import pytest

import runner.executor
from runner.errors import BadRequest, InferenceError, RunnerError, Unavailable
from runner.executor import Executor
from tests.support.fake_device import eventually
from tests.support.helpers import HANG_S, run_in_lane


def test_third_request_on_a_full_lane_is_refused_with_retry_after():
    async def main():
        executor = Executor(max_queue=1)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(executor.admit("p:m", 1))  # running
            lane = await stack.enter_async_context(executor.admit("p:m", 1))  # queued
            assert lane.pending == 2
            with pytest.raises(Unavailable) as info:
                async with executor.admit("p:m", 1):
                    pass
            assert lane.pending == 2  # the refused request took no place
            # Another model's lane is independent.
            async with executor.admit("p:other", 1) as other:
                assert other.pending == 1
        assert lane.pending == 0
        # Room again once the first two finished.
        async with executor.admit("p:m", 1):
            pass
        return info.value

    error = asyncio.run(main())
    assert error.status_code == 503
    assert int(error.headers["Retry-After"]) >= 1


def test_concurrency_widens_the_lane():
    async def main():
        executor = Executor(max_queue=0)
        async with AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(executor.admit("p:m", 3))
            with pytest.raises(Unavailable):
                await stack.enter_async_context(executor.admit("p:m", 3))

    asyncio.run(main())


def test_run_limits_concurrency_and_runs_off_the_event_loop():
    loop_thread = threading.get_ident()
    running, peak, threads = 0, 0, set()
    lock = threading.Lock()
    release = threading.Event()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        assert release.wait(HANG_S)
        with lock:
            running -= 1
        return i * 10

    async def main():
        executor = Executor(max_queue=4)

        async def one(i: int) -> int:
            async with executor.admit("p:m", 2) as lane:
                return await run_in_lane(executor, lane, work, i)

        tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
        await eventually(lambda: running == 2)  # until both slots are busy
        await asyncio.sleep(0.05)  # a third run would have started by now
        assert running == 2
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [0, 10, 20, 30]
    assert peak == 2
    assert loop_thread not in threads


def run_failing(exc: BaseException) -> BaseException:
    def fail():
        raise exc

    async def main():
        executor = Executor(max_queue=1)
        async with executor.admit("p:m", 1) as lane:
            await run_in_lane(executor, lane, fail)

    with pytest.raises(BaseException) as info:
        asyncio.run(main())
    return info.value


def test_plain_exception_becomes_inference_error_with_cause():
    original = ValueError("shape mismatch in layer 3")
    error = run_failing(original)
    assert type(error) is InferenceError
    assert error.status_code == 500
    assert error.__cause__ is original
    assert "ValueError" in error.msg


@pytest.mark.parametrize("cls", [BadRequest, Unavailable, InferenceError])
def test_runner_errors_pass_through_unchanged(cls):
    original = cls("the model said no")
    assert run_failing(original) is original


def test_out_of_memory_error_becomes_inference_error(monkeypatch):
    freed = []
    monkeypatch.setattr(runner.executor, "free_device_memory", lambda: freed.append(1))

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError has
        pass

    original = OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    error = run_failing(original)
    assert type(error) is InferenceError
    assert isinstance(error, RunnerError) and error.status_code == 500
    assert "out of memory" in error.msg.lower()
    assert error.__cause__ is original
    assert freed == [1]  # what the failed run held is released before answering


def test_plain_failure_does_not_free_device_memory(monkeypatch):
    freed = []
    monkeypatch.setattr(runner.executor, "free_device_memory", lambda: freed.append(1))
    run_failing(KeyError("x"))
    assert freed == []


def test_lane_records_service_time_and_retry_after_follows_it():
    def slow():
        threading.Event().wait(0.05)

    async def main():
        executor = Executor(max_queue=1)
        async with executor.admit("p:m", 1) as lane:
            before = lane.mean_seconds
            await run_in_lane(executor, lane, slow)
            assert lane.mean_seconds != before
            lane.mean_seconds = 10.0
            assert lane.retry_after() == 10  # 10 s per request, 1 pending, 1 at a time
        lane.pending = 3
        assert lane.retry_after() == 30
        lane.mean_seconds = 0.001
        assert lane.retry_after() == 1  # never less than a second

    asyncio.run(main())


def test_out_of_memory_frees_and_retries_once_then_succeeds():
    import anyio

    from runner.executor import Executor

    class OutOfMemoryError(RuntimeError):
        pass

    calls, freed = [], []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OutOfMemoryError("CUDA out of memory")
        return "ok"

    async def main():
        executor = Executor(max_queue=1)
        async with executor.admit("m", 1) as lane:
            return await run_in_lane(executor, lane, flaky, on_oom=lambda: freed.append(1))

    assert anyio.run(main) == "ok"
    assert len(calls) == 2 and len(freed) == 1


def test_out_of_memory_twice_is_a_500():
    import anyio
    import pytest

    from runner.errors import InferenceError
    from runner.executor import Executor

    class OutOfMemoryError(RuntimeError):
        pass

    freed = []

    def always():
        raise OutOfMemoryError("CUDA out of memory")

    async def main():
        executor = Executor(max_queue=1)
        async with executor.admit("m", 1) as lane:
            await run_in_lane(executor, lane, always, on_oom=lambda: freed.append(1))

    with pytest.raises(InferenceError, match="out of memory"):
        anyio.run(main)
    assert len(freed) == 1
