"""TensorBoard and W&B get the same numbers as metrics.jsonl, read back with their own readers."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megalite.config import ConfigError
from megalite.training import loggers
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="tensorboard is not installed (pip install -e '.[test]')")


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir, *extra):
    cfg = tiny_config(str(run_dir), "train.train_steps=4", "train.eval_interval=2", "train.eval_steps=1", *extra)
    Trainer(cfg).train()
    return _rows(run_dir)


@needs_tb
def test_tensorboard_events_hold_every_logged_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _train(tmp_path, "logging.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "eval_loss", "eval_ppl"} <= expected == tags
    for tag in tags:
        got = {e.step: e.value for e in acc.Scalars(tag)}
        want = {r["step"]: r[tag] for r in rows if isinstance(r.get(tag), (int, float))}
        assert got.keys() == want.keys(), tag
        for step, v in want.items():  # event files store float32
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-12), (tag, step)


@needs_tb
def test_resumed_run_replaces_the_redone_steps(tmp_path):
    """A run resumed from step 2 purges the first run's events after step 2, as metrics.jsonl drops its rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["logging.tensorboard=true", "checkpoint.load=auto", "checkpoint.save_interval=2"]
    cfg = tiny_config(str(tmp_path), "train.train_steps=3", "train.exit_interval=2", *extra)
    Trainer(cfg).train()  # stops and saves at step 2
    rows = _train(tmp_path, *extra)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_missing_package_is_one_line_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ConfigError, match=r"^logging.tensorboard=true needs the tensorboard package"):
        Trainer(tiny_config(str(tmp_path), "train.train_steps=1", "logging.tensorboard=true"))
    with pytest.raises(ConfigError, match=r"^logging.wandb_project=p needs the wandb package"):
        Trainer(tiny_config(str(tmp_path), "train.train_steps=1", "logging.wandb_project=p"))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


def _wandb_history(path) -> dict[int, dict[str, float]]:
    """The history rows of an offline .wandb file: a W&B header, then LevelDB-log framed records
    (7-byte headers in 32 KiB blocks) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, out = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(payload)
            payload = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_gets_the_same_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = _train(tmp_path, "logging.wandb_project=megalite-test", "logging.wandb_mode=offline")
    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    history = _wandb_history(next(run.glob("run-*.wandb")))
    assert sorted(history) == [r["step"] for r in rows]
    for r in rows:
        want = {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        assert history[r["step"]] == pytest.approx(want, rel=1e-12), r["step"]
    assert (tmp_path / "wandb_id").read_text().strip() in run.name  # a resumed run continues this id
