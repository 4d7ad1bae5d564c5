"""Mass-access detection shared across instances (real Redis), and the refusal through a real proxy."""

from __future__ import annotations

import time

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.decision.massaccess import MassAccessMonitor, unthrottle


def monitors(r, tmp_path, **kw):
    logs = [AuditLog(tmp_path, name).open() for name in ("px1", "px2")]
    opts = dict(max_patients=3, window_seconds=60, action="throttle", throttle_seconds=30, refresh_seconds=0.05)
    opts.update(kw)
    return logs, [MassAccessMonitor(r, log, **opts) for log in logs]


def test_distinct_patients_across_instances_raise_one_alert_and_throttle_everywhere(r, tmp_path):
    logs, (m1, m2) = monitors(r, tmp_path)
    now = time.time()
    m1.note("dr.x", "P1", now); m1.note("dr.x", "P1", now)  # the same patient counts once
    m2.note("dr.x", "P2", now); m2.note("dr.x", "P3", now)
    m1.process(); m2.process()
    assert not m1.blocked("dr.x", now) and m1.alerts == m2.alerts == 0  # 3 distinct: not more than 3
    m2.note("dr.x", "P4", now)
    m2.process()
    assert m2.alerts == 1 and m2.blocked("dr.x", now)  # the detecting instance applies it at once
    assert not m1.blocked("dr.x", now)
    m1.refresh()  # what the worker does every refresh_seconds
    assert m1.blocked("dr.x", now) and not m1.blocked("dr.y", now)
    m1.note("dr.x", "P5", now)
    m1.process()
    assert m1.alerts == 0  # one alert per window, whichever instance sees it
    for log in logs:
        log.close()
    alerts = [rec for rec in read_records(tmp_path) if rec["event"] == "mass_access"]
    assert len(alerts) == 1 and alerts[0]["user"] == "dr.x" and alerts[0]["patients"] == 4
    assert unthrottle(r, "dpiguard", "dr.x")
    m1.refresh()
    assert not m1.blocked("dr.x", now)


def test_old_accesses_leave_the_window_and_alert_mode_does_not_throttle(r, tmp_path):
    logs, (m1, _) = monitors(r, tmp_path, action="alert", window_seconds=60)
    old = time.time() - 120
    for p in ("P1", "P2", "P3"):
        m1.note("dr.z", p, old)
    m1.process()
    m1.note("dr.z", "P4", time.time())
    m1.process()
    assert m1.alerts == 0  # the three old ones are outside the window
    for p in ("P5", "P6", "P7"):
        m1.note("dr.z", p, time.time())
    m1.process()
    assert m1.alerts == 1 and not m1.blocked("dr.z", time.time())
    for log in logs:
        log.close()


def test_worker_thread_counts_in_background(r, tmp_path):
    logs, (m1, _) = monitors(r, tmp_path)
    m1.start()
    try:
        for i in range(5):
            m1.note("dr.w", f"P{i}", time.time())
        deadline = time.monotonic() + 5
        while not m1.blocked("dr.w", time.time()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        m1.stop()
        for log in logs:
            log.close()
