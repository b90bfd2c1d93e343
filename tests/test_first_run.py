"""Issue 12 item 12: what a first run shows: a smoothed tok/s, the final checkpoint's path, docs
that stand alone in a clone, and a demo corpus the README's data commands can start from."""

from __future__ import annotations

import json
import re
from pathlib import Path

from megalite.data import corpus
from megalite.training.metrics import MetricsLogger
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_console_rate_is_smoothed(tmp_path, capsys):
    m = MetricsLogger(str(tmp_path), 4, True, False)
    for step, rate in enumerate([1000.0, 6000.0, 1000.0, 6000.0], 1):
        m.console(step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": rate, "mfu": None,
                         "step_time": 1.0})
    rates = [float(x) for x in re.findall(r"\| ([\d.]+)k tok/s", capsys.readouterr().out)]
    assert rates[0] == 1.0 and max(rates) / min(rates) < 2  # raw rates jump 6x between lines
    assert rates[-1] == round(4 / (2 / 1000 + 2 / 6000) / 1000, 1)  # tokens over time of the window


def test_a_normal_run_prints_its_checkpoint_path(tmp_path, capsys):
    Trainer(tiny_config(str(tmp_path), "train.train_steps=2", "checkpoint.save_on_exit=true")).train()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"saved checkpoint {tmp_path / 'checkpoints' / 'step_00000002'}"


def test_docs_stand_alone():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links and all(not x.startswith("..") and (ROOT / x).exists() for x in links if "://" not in x), links
    assert (ROOT / "docs" / "architecture.md").is_file()
    assert "source .venv/bin/activate" in readme and "--vocab-size 4000 --output tok.model" in readme


def test_demo_corpus_as_jsonl(tmp_path):
    assert corpus.main(["--output", str(tmp_path / "raw.jsonl"), "--max-docs", "3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["text"], str) and r["text"] for r in rows)
