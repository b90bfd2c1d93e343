"""The CLI: bad input exits non-zero with one clear line and no traceback, before any work starts;
SIGTERM mid-run writes a checkpoint at the next step boundary and exits cleanly.

Error cases call `megalite.cli.main` in-process (a subprocess costs ~2.5 s of torch import each);
one error case and the SIGTERM case run the real `python -m megalite.cli` entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalite import cli
from tests.training.common import TINY

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: Triton on a CPU must be refused
    return subprocess.run([sys.executable, "-m", "megalite.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _cli_in_process(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`megalite.cli.main(args)` in this process, with the environment variables `_cli` removes."""
    for var in ("WORLD_SIZE", "RANK", "TRITON_INTERPRET"):  # as a user's shell: Triton on a CPU is refused
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()  # drop anything printed before
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["megalite", *args], code, out, err)


def _check_one_line_error(r: subprocess.CompletedProcess, run_dir: Path, expected: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (run_dir / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.parametrize("overrides, expected", [
    (["model.num_heads=4", "parallel.tp=3"], "model.num_heads 4 is not divisible by parallel.tp 3"),
    (["parallel.tp=2", "parallel.pp=2"], "world size 1 is not divisible by tp*pp*cp"),
    (["parallel.tp=2", "parallel.sp=true", "train.seq_len=33"], "train.seq_len 33 is not divisible by parallel.tp 2"),
    (["model.hidden_sise=64"], "unknown config key 'model.hidden_sise'"),
    (["train.micro_batch_size=two"], "'train.micro_batch_size' in command-line overrides: expected an integer"),
    (["optim.decay=exponential"], "unknown optim.decay 'exponential'"),
    (["train.precision=fp8"], "precision=fp8"),  # never a silent downgrade to bf16
    (["parallel.pipeline_schedule=zigzag"], "unknown parallel.pipeline_schedule 'zigzag'"),
    (["model.norm_impl=triton"], "model.norm_impl=triton runs Triton kernels, which need a CUDA GPU"),
    (["model.loss_impl=liger"], "model.loss_impl 'liger' is not available"),
])
def test_bad_config_is_one_line(tmp_path, monkeypatch, capsys, overrides, expected):
    r = _cli_in_process(monkeypatch, capsys, "pretrain", *TINY, f"train.run_dir={tmp_path}", *overrides)
    _check_one_line_error(r, tmp_path, expected)


def test_bad_config_through_the_entry_point(tmp_path):
    """The real `python -m megalite.cli`: exit status 2 and one line on stderr, in a fresh process."""
    r = _cli("pretrain", *TINY, f"train.run_dir={tmp_path}", "model.norm_impl=triton")
    _check_one_line_error(r, tmp_path, "model.norm_impl=triton runs Triton kernels, which need a CUDA GPU")


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    r = _cli_in_process(monkeypatch, capsys, "pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def test_unknown_key_in_yaml_names_the_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  hidden: 64\n")
    r = _cli_in_process(monkeypatch, capsys, "pretrain", "--config", str(f))
    assert r.returncode == 2 and r.stderr.strip() == f"error: unknown config key 'model.hidden' in {f}"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megalite.cli", "pretrain", *TINY, f"train.run_dir={tmp_path}",
                             "train.train_steps=100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped cleanly after step" in out and "Traceback" not in err
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 2 and (tmp_path / "checkpoints" / latest / "meta.json").is_file()


def test_a_run_failure_is_one_line_and_exit_code_1(monkeypatch, capsys):
    from megalite.config import RunError

    def fails(*args):
        raise RunError("checkpoint of step 3 (ck/step_00000003) was not saved on rank 0: OSError: disk full")

    monkeypatch.setattr(cli, "_run", fails)
    assert cli.main(["pretrain"]) == 1
    err = capsys.readouterr().err
    assert err == "error: checkpoint of step 3 (ck/step_00000003) was not saved on rank 0: OSError: disk full\n"
