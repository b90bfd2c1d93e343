"""Issue 12 items 8 and 11: storage faults and corrupt checkpoints end in one line naming the path,
tensor or rank; a SIGTERM on one rank is reported as the preemption it is."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalite import cli
from megalite.config import ConfigError, RunError
from megalite.testing import run_distributed
from megalite.training import metrics as metrics_mod
from megalite.training.preemption import PreemptionGuard
from megalite.training.trainer import Trainer
from tests.training.common import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _one_signalled_rank(rank: int, world: int):
    guard = PreemptionGuard()
    try:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only this rank is signalled
        return guard.should_stop(torch.device("cpu")), guard.stop_line(7)
    finally:
        guard.restore()


@pytest.mark.slow
def test_sigterm_on_one_rank_is_reported_as_preemption_on_every_rank():
    for stop, line in run_distributed(_one_signalled_rank, 2):
        assert stop and line == "stopped cleanly after step 7 (preemption signal)"


def _save_steps(tmp_path, n: int) -> Path:
    Trainer(tiny_config(str(tmp_path), f"train.train_steps={n}", "checkpoint.save_interval=1")).train()
    return tmp_path / "checkpoints"


def test_a_corrupt_checkpoint_names_the_intact_older_one(tmp_path):
    ck = _save_steps(tmp_path, 2)
    (ck / "step_00000002" / "rank_00000.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(str(tmp_path), "train.train_steps=3", "checkpoint.load=auto"))
    msg = str(e.value)
    assert f"{ck / 'step_00000002' / 'rank_00000.pt'}: cannot read checkpoint shard" in msg
    assert f"an older checkpoint is beside it: checkpoint.load={ck / 'step_00000001'}" in msg


def test_a_wrong_shaped_stored_tensor_names_tensor_shapes_and_file(tmp_path):
    ck = _save_steps(tmp_path, 1)
    f = ck / "step_00000001" / "rank_00000.pt"
    payload = torch.load(f, weights_only=False)
    payload["model"]["layers.0.mlp.down.weight"] = torch.zeros(64, 100)
    torch.save(payload, f)
    expected = (f"{f}: tensor 'layers.0.mlp.down.weight' is stored with shape [64, 100], "
                f"the checkpoint metadata says [64, 128]")
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(str(tmp_path), "train.train_steps=2", "checkpoint.load=auto"))
    assert str(e.value) == expected
    from megalite.checkpoint.global_weights import load_global_weights  # what convert --to hf reads

    with pytest.raises(ConfigError) as e:
        load_global_weights(ck)
    assert str(e.value) == expected


def test_a_metrics_write_error_still_saves_the_checkpoint(tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(path, *a, **k):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(metrics_mod, "open", full_disk_open, raising=False)
    t = Trainer(tiny_config(str(tmp_path), "train.train_steps=5"))
    with pytest.raises(RunError) as e:
        t.train()
    assert str(e.value).startswith(f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device "
                                   f"(checkpoint of step 1 saved")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_a_checkpoint_larger_than_the_space_left_is_one_line(tmp_path):
    """A size-limited file (RLIMIT_FSIZE in the child) stands in for a full disk: the rank file of
    the checkpoint cannot be written, metrics.jsonl (small) can."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("WORLD_SIZE", "RANK", "TRITON_INTERPRET"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-m", "megalite.cli", "pretrain", *TINY, f"train.run_dir={tmp_path}",
                        "train.train_steps=1", "checkpoint.save_on_exit=true"], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT, preexec_fn=_limit_file_size)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: checkpoint of step 1 ({tmp_path / 'checkpoints' / 'step_00000001'}) was not saved on rank 0: "
        f"File too large"]
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_a_read_only_run_dir_is_one_line(tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        # root writes through permission bits: make the run dir an existing *file*'s child instead.
        run_dir = tmp_path / "afile" / "run"
        (tmp_path / "afile").write_text("")
        reason = "Not a directory"
    else:
        run_dir = tmp_path / "ro" / "run"
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        reason = "Permission denied"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["pretrain", *TINY, f"train.run_dir={run_dir}", "train.train_steps=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and reason in err and str(run_dir) in err
