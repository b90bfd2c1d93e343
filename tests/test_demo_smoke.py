"""The CI smoke demo: the whole pipeline at its smallest, through the real commands.

Each stage's own metric must move the right way, the report must hold every stage and its plots,
and a second run must reuse every finished stage instead of training again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.pipeline.runner import MARKER, cli_stage_available

ROOT = Path(__file__).resolve().parents[1]


def _demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DEMO_SIZE": "smoke"}
    env.pop("FRESH", None)
    return subprocess.run([sys.executable, "-m", "megalite.demo", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _stage(out: Path, name: str) -> dict | None:
    p = out / name / MARKER
    return json.loads(p.read_text()) if p.is_file() else None


@pytest.mark.slow
def test_smoke_demo_improves_every_stage_and_reuses_on_rerun(tmp_path):
    out = tmp_path / "demo"
    r = _demo(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    clean = _stage(out, "clean")["metrics"]
    assert clean["kept_docs"] < clean["input_docs"] and clean["emails_scrubbed"] > 0
    assert "@python.org" not in (out / "clean" / "clean.jsonl").read_text()
    tok = _stage(out, "tokenizer")["metrics"]
    assert tok["vocab"] == 600 and tok["chat_tokens"] == 5
    shards = _stage(out, "shards")["metrics"]
    assert shards["text_tokens"] > 0 and shards["sft_pairs"] > 0 and shards["preference_pairs"] > 0

    pre = _stage(out, "pretrain")["metrics"]
    assert pre["eval_ppl_last"] < pre["eval_ppl_first"] and pre["eval_ppl_last_step"] == 40
    sft = _stage(out, "sft")["metrics"]
    assert sft["eval_loss_last"] < sft["eval_loss_first"] and sft["eval_loss_last_step"] == 30
    for name in ("rm", "dpo"):
        m = _stage(out, name)
        if cli_stage_available(name):
            # The first eval comes after a few steps, already above chance on this easy task, and a
            # smoke eval holds only 8 pairs: the held-out loss must fall and the accuracy end well
            # above chance (0.5; a fresh score head, or DPO's policy = reference at step 0).
            mm = m["metrics"]
            assert mm["eval_loss_last"] < mm["eval_loss_first"] and mm["eval_accuracy_last"] >= 0.75, m
            if name == "dpo":
                assert mm["eval_margin_last"] > mm["eval_margin_first"] > 0, m
        else:  # not in this build: reported as skipped, and the run still succeeds
            assert m is None and f"{name:<10} skipped  skipped: stage not available in this build" in r.stdout
    grpo = _stage(out, "grpo")
    if cli_stage_available("grpo"):
        # At smoke size the model never writes a function that parses (reward 0 throughout: no
        # signal), so only the plumbing is checked here; the full demo's report shows the trend.
        rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7)), grpo
        assert all(0.0 <= r["mean_reward"] <= 1.0 and r["response_length"] > 0 for r in rows), rows
    else:
        assert grpo is None

    samples = _stage(out, "samples")["metrics"]
    assert samples["prompts"] == 3 and len(samples["samples"]) == 3
    assert all(s["sft"] for s in samples["samples"])  # the SFT model answered each held-out prompt
    report = (out / "REPORT.md").read_text()
    for name in ("collect", "clean", "tokenizer", "shards", "pretrain", "sft", "rm", "dpo", "grpo", "samples"):
        assert f"| {name}: " in report
    pytest.importorskip("matplotlib")
    for png in ("loss.png", "eval_ppl.png"):
        assert (out / "plots" / png).stat().st_size > 1000 and f"plots/{png}" in report

    before = {n: (out / n / MARKER).stat().st_mtime_ns for n in ("pretrain", "sft", "samples")}
    r2 = _demo(out)
    assert r2.returncode == 0, r2.stdout[-3000:]
    assert "$ megalite" not in r2.stdout and "step 10/" not in r2.stdout  # nothing trained again
    for n in ("collect", "clean", "tokenizer", "shards", "pretrain", "sft", "samples"):
        assert f"{n:<10} reused" in r2.stdout
    assert before == {n: (out / n / MARKER).stat().st_mtime_ns for n in before}
