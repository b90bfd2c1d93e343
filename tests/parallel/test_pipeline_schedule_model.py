"""The schedules' own structure, checked without processes: for many (p, m, v) each rank's issued
operations (traced from the real schedule functions) match up message for message, never
deadlock under rendezvous p2p, and idle for exactly the theoretical bubble. A schedule that was
secretly sequential would idle (p-1)/p of the time and fail here."""

from __future__ import annotations

import pytest

from megalite.parallel.pipeline.p2p import FORWARD_TAG
from megalite.parallel.pipeline.simulate import critical_path, idle_fraction, theoretical_idle, trace_schedule

GRID = [(s, p, m, 1) for s in ("afab", "1f1b") for p in (2, 3, 4, 8) for m in (1, 2, 3, p, 2 * p + 1)]
GRID += [("interleaved", p, m, v) for p in (2, 3, 4) for v in (2, 3) for m in (p, 2 * p, 3 * p)]


@pytest.mark.parametrize("schedule,p,m,v", GRID)
def test_schedule_reaches_theoretical_bubble(schedule: str, p: int, m: int, v: int):
    traces = trace_schedule(schedule, p, m, v, t_fwd=1.0, t_bwd=2.0)
    makespan, busy = critical_path(traces)
    assert busy == [pytest.approx(m * 3.0)] * p  # every rank computes each (chunk, micro-batch) once
    assert idle_fraction(makespan, busy) == pytest.approx(theoretical_idle(schedule, p, m, v), abs=1e-9)


@pytest.mark.parametrize("schedule,p,m,v", [("afab", 4, 3, 1), ("1f1b", 4, 6, 1), ("interleaved", 2, 4, 2),
                                            ("interleaved", 4, 8, 2)])
def test_forward_only_runs_without_deadlock(schedule: str, p: int, m: int, v: int):
    traces = trace_schedule(schedule, p, m, v, forward_only=True)
    makespan, busy = critical_path(traces)
    assert busy == [pytest.approx(m * 1.0)] * p
    assert makespan == pytest.approx((m * v + p - 1) * 1.0 / v)  # a pure forward pipeline


def test_simulator_detects_deadlock_and_unmatched_messages():
    # Both ranks receive before they send, each in its own exchange: neither ever posts its send.
    recv_then_send = [[("exchange", [("recv", 1 - r, FORWARD_TAG)]), ("exchange", [("send", 1 - r, FORWARD_TAG)])]
                      for r in range(2)]
    with pytest.raises(RuntimeError, match="deadlock"):
        critical_path(recv_then_send)
    with pytest.raises(RuntimeError, match="matching"):
        critical_path([[("exchange", [("send", 1, FORWARD_TAG)])], []])
