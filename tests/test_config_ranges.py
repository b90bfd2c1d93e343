"""Issue 12 item 5: every numeric field's range is checked at load, one line naming the key."""

from __future__ import annotations

import pytest

from megalite import cli
from megalite.config import ConfigError, load_config
from tests.training.common import TINY


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-3", "optim.lr must be > 0, got -0.001"),
    ("train.train_steps=-5", "train.train_steps must be >= 0"),
    ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 0, got -1"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0, got 0"),
    ("train.seq_len=0", "train.seq_len must be > 0, got 0"),
    ("train.log_interval=0", "train.log_interval must be > 0, got 0"),
    ("train.eval_steps=0", "train.eval_steps must be > 0"),
    ("model.hidden_dropout=1.0", "model.hidden_dropout must be in [0, 1)"),
    ("optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
    ("optim.lr=nan", "optim.lr must be > 0, got nan"),
    ("optim.min_lr=1.0", "optim.min_lr 1.0 is larger than optim.lr 0.0003"),
])
def test_out_of_range_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message or message in str(e.value)
    assert "\n" not in str(e.value)


def test_zero_train_steps_is_refused_by_training_stages(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # (megalite rm evaluates a checkpoint with it)
    assert cli.main(["pretrain", *TINY, f"train.run_dir={tmp_path}", "train.train_steps=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.train_steps must be > 0 for megalite pretrain" in err[0]


def test_the_example_values_pass():
    load_config(None, ["optim.lr=3e-4", "optim.min_lr=0", "train.eval_interval=0", "checkpoint.keep_last=0"])


@pytest.mark.parametrize("override", ["train.micro_batch_size=0", "train.log_interval=0", "train.seq_len=0"])
def test_the_cli_prints_one_line_instead_of_zero_division(override, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pretrain", *TINY, f"train.run_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_no_config_and_no_model_is_refused(capsys, monkeypatch, tmp_path):
    """The built-in default model is 6.7B: without --config (or model.* overrides) it would OOM."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pretrain", f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no --config given") and "examples/configs/tiny.yaml" in err
    assert err.count("\n") == 1


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr()
    assert "usage: megalite" in out.out + out.err and "required: stage, overrides" not in out.err
