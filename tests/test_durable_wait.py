"""The durable trace on the event loop: one writer wake-up per loop round, one loop wake-up per batch,
and still no answer before its record is on disk (real AuditLog on a real folder, real asyncio loop)."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Future

import pytest

from dpiguard.audit.chain import AuditError, AuditLog, read_records
from dpiguard.decision.verdict import Incoming
from dpiguard.edge.flows import durable, durable_now, durable_wait

REQ = Incoming(method="GET", target="/x", headers={}, client_ip="127.0.0.1", tls=False)


def record(i: int) -> dict:
    return {"event": "access", "outcome": "allow", "reason": "allowed", "request_id": f"r{i}"}


def test_records_of_one_loop_round_go_in_one_batch(tmp_path):
    """Records queued by the loop in one round wake the writer once: one batch (and one fsync)."""
    log = AuditLog(tmp_path, "px1").open()

    async def main():
        log.wake_later(asyncio.get_running_loop().call_soon)
        before = log.batches
        futures = []
        for i in range(50):  # the requests of one round, each with some work that releases the GIL
            futures.append(log.submit(record(i)))
            time.sleep(0.0002)
        assert all(f is futures[0] for f in futures)  # one batch future for the round
        results = await asyncio.gather(*(durable(f, log, "refuse", REQ) for f in futures))
        return results, log.batches - before

    try:
        results, batches = asyncio.run(main())
    finally:
        log.close()
    assert results == [True] * 50
    assert batches == 1
    assert sum(1 for r in read_records(tmp_path) if r["event"] == "access") == 50


def test_a_blocking_write_on_the_loop_thread_is_not_deferred(tmp_path):
    """AuditLog.write blocks its thread: it wakes the writer itself, even on the deferring thread."""
    log = AuditLog(tmp_path, "px1", write_timeout=0.5).open()

    async def main():
        log.wake_later(asyncio.get_running_loop().call_soon)
        log.write(record(1))  # would time out (AuditError) if its wake-up waited for this loop round

    try:
        asyncio.run(main())
    finally:
        log.close()


def test_no_wait_once_the_batch_is_on_disk(tmp_path):
    log = AuditLog(tmp_path, "px1").open()
    try:
        future = log.submit(record(1))
        future.result(5)
        assert durable_now(future, log, "refuse", REQ) is True

        async def main():
            return durable_wait(future, 1.0)

        assert asyncio.run(main()) is None
    finally:
        log.close()


def test_batch_shares_one_loop_future_and_a_cancelled_request_leaves_the_others_waiting(tmp_path):
    """Every request of a batch awaits one loop future; cancelling one request's task does not cancel
    the batch for the others, which answer only once the record is on disk."""
    log = AuditLog(tmp_path, "px1").open()

    async def main():
        loop = asyncio.get_running_loop()
        log.wake_later(loop.call_soon)
        released = asyncio.Event()
        original = os.write

        def slow_write(fd, data):  # the batch reaches the disk only once the test says so
            asyncio.run_coroutine_threadsafe(released.wait(), loop).result(5)
            return original(fd, data)

        futures = [log.submit(record(i)) for i in range(3)]
        os.write = slow_write
        try:
            waits = [durable_wait(f, 5.0) for f in futures]
            assert waits[0] is waits[1] is waits[2]
            tasks = [asyncio.create_task(durable(f, log, "refuse", REQ)) for f in futures]
            await asyncio.sleep(0.05)
            assert not any(t.done() for t in tasks)  # not on disk yet: nobody answered
            tasks[0].cancel()
            await asyncio.sleep(0.05)
            assert not tasks[1].done() and not tasks[2].done()
            released.set()
            results = [await tasks[1], await tasks[2]]
        finally:
            os.write = original
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        return results

    try:
        assert asyncio.run(main()) == [True, True]
    finally:
        log.close()


def test_not_durable_in_time_is_a_refusal_and_a_failed_batch_too(tmp_path):
    log = AuditLog(tmp_path, "px1").open()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            never = Future()  # a batch that never reaches the disk
            late = await durable(never, log, "refuse", REQ)
            failed = Future()
            loop.call_later(0.01, failed.set_exception, AuditError("disk full"))
            broken = await durable(failed, log, "refuse", REQ)
            served = await durable(Future(), log, "serve", REQ)  # audit.on_failure=serve: logged, served
            return late, broken, served

        log.write_timeout = 0.2
        assert asyncio.run(main()) == (False, False, True)
    finally:
        log.close()


def test_a_batch_written_between_the_two_looks_is_durable(tmp_path):
    """The batch reaches the disk after durable_now looked and before durable_wait does: durable."""
    class WrittenMeanwhile(Future):
        looks = 0

        def done(self):
            self.looks += 1
            return self.looks > 1 and super().done()

    log = AuditLog(tmp_path, "px1").open()
    try:
        future = WrittenMeanwhile()
        future.set_result(1)
        assert asyncio.run(durable(future, log, "refuse", REQ)) is True
    finally:
        log.close()
