"""metrics.jsonl: every line reaches the file at once; the disk sync happens once, at close."""

from __future__ import annotations

import json

from megalite.training import metrics


def test_lines_are_flushed_per_log_and_fsynced_once_at_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(metrics.os, "fsync", lambda fd: synced.append(fd))
    log = metrics.MetricsLogger(str(tmp_path), 3, enabled=True)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
        rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, step + 1))  # readable by others right away
    assert synced == []
    log.close()
    log.close()  # idempotent
    assert len(synced) == 1
