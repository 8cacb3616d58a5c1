from __future__ import annotations

import asyncio

import pytest

from stowaway.registry.singleflight import SingleFlight


def test_hundred_concurrent_callers_run_work_once() -> None:
    async def main() -> None:
        sf: SingleFlight[str] = SingleFlight()
        calls = 0
        gate = asyncio.Event()

        async def work() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            return "image"

        tasks = [asyncio.create_task(sf.do("shell/git", work)) for _ in range(100)]
        await asyncio.sleep(0)
        assert len(sf) == 1
        gate.set()
        results = await asyncio.gather(*tasks)
        assert results == ["image"] * 100
        assert calls == 1 and sf.runs == 1
        assert len(sf) == 0
        # a later call runs again: single-flight is not a cache
        assert await sf.do("shell/git", work) == "image"
        assert calls == 2

    asyncio.run(main())


def test_distinct_keys_run_separately_and_errors_are_shared() -> None:
    async def main() -> None:
        sf: SingleFlight[int] = SingleFlight()

        async def boom() -> int:
            await asyncio.sleep(0.01)
            raise ValueError("unknown package foo")

        async def one() -> int:
            return 1

        results = await asyncio.gather(
            *(sf.do("bad", boom) for _ in range(10)), sf.do("good", one), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, ValueError)]
        assert len(errors) == 10 and results[-1] == 1
        assert sf.runs == 2

    asyncio.run(main())


def test_cancelled_waiter_does_not_cancel_work() -> None:
    async def main() -> None:
        sf: SingleFlight[str] = SingleFlight()
        gate = asyncio.Event()

        async def work() -> str:
            await gate.wait()
            return "done"

        first = asyncio.create_task(sf.do("k", work))
        second = asyncio.create_task(sf.do("k", work))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == "done"
        assert sf.runs == 1

    asyncio.run(main())
