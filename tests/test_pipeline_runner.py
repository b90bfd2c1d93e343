"""The demo's stage runner: keys, reuse, FRESH, downstream invalidation, failures and gating.

Stages here are tiny real subprocesses (`python -c ...`) appending to a log, so a test sees exactly
which ones ran."""

from __future__ import annotations

import json
from pathlib import Path

from megalite.pipeline.runner import MARKER, Stage, cli_stage_available, run_stages


def _stages(tmp: Path, cfg: Path, fail: bool = False, requires: tuple[str, ...] = ()) -> list[Stage]:
    log = tmp / "ran.txt"

    def cmd(name: str, code: int = 0) -> list[str]:
        return ["python", "-c", f"open({str(log)!r}, 'a').write('{name}\\n'); raise SystemExit({code})"]

    return [
        Stage("a", "first", [cmd("a")], configs=(str(cfg),), summarize=lambda d: {"n": 1}, line=lambda m: f"n={m['n']}"),
        Stage("b", "second", [cmd("b", 3 if fail else 0)], deps=("a",)),
        Stage("c", "gated", [cmd("c")], deps=("b",), requires=requires),
    ]


def _ran(tmp: Path) -> list[str]:
    p = tmp / "ran.txt"
    out = p.read_text().split() if p.exists() else []
    p.unlink(missing_ok=True)
    return out


def test_reuse_fresh_and_invalidation(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("x: 1\n")
    out = tmp_path / "out"
    res = run_stages(_stages(tmp_path, cfg), out)
    assert [r.status for r in res] == ["ran"] * 3 and _ran(tmp_path) == ["a", "b", "c"]
    assert res[0].line == "n=1" and json.loads((out / "a" / MARKER).read_text())["metrics"] == {"n": 1}
    assert (out / "b" / "log.txt").read_text().startswith("$ python -c")

    res = run_stages(_stages(tmp_path, cfg), out)  # nothing changed: nothing runs
    assert [r.status for r in res] == ["reused"] * 3 and _ran(tmp_path) == []
    assert res[0].line == "n=1"

    cfg.write_text("x: 2\n")  # a's input changed: a and everything downstream run again
    res = run_stages(_stages(tmp_path, cfg), out)
    assert [r.status for r in res] == ["ran"] * 3 and _ran(tmp_path) == ["a", "b", "c"]

    res = run_stages(_stages(tmp_path, cfg), out, fresh=True)
    assert _ran(tmp_path) == ["a", "b", "c"]


def test_failure_stops_and_leaves_no_marker(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("x: 1\n")
    out = tmp_path / "out"
    res = run_stages(_stages(tmp_path, cfg, fail=True), out)
    assert [r.status for r in res] == ["ran", "failed"] and "exit 3" in res[1].line
    assert _ran(tmp_path) == ["a", "b"] and not (out / "b" / MARKER).exists()
    res = run_stages(_stages(tmp_path, cfg), out)  # fixed: a is reused, b runs from a clean dir
    assert [r.status for r in res] == ["reused", "ran", "ran"] and _ran(tmp_path) == ["b", "c"]


def test_missing_cli_stage_is_skipped_not_failed(tmp_path, monkeypatch):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("x: 1\n")
    import megalite.cli

    monkeypatch.setitem(megalite.cli.STAGES, "nosuch", "megalite.no_such_module:run")
    res = run_stages(_stages(tmp_path, cfg, requires=("nosuch",)), tmp_path / "out")
    assert [r.status for r in res] == ["ran", "ran", "skipped"]
    assert res[2].line == "skipped: stage not available in this build (megalite nosuch)"
    assert _ran(tmp_path) == ["a", "b"]


def test_cli_stage_available_needs_the_run_function():
    assert cli_stage_available("sft") and cli_stage_available("pretrain")
    # megalite/alignment/dpo.py holds the loss math; `megalite dpo` exists only once it has run()
    import megalite.alignment.dpo as dpo

    assert cli_stage_available("dpo") == callable(getattr(dpo, "run", None))
