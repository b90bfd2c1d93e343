"""`parallel.vpp > 1` with the default schedule (1f1b) means interleaved 1F1B, as in Megatron;
AFAB has no interleaved form, so afab with vpp > 1 stays a one-line config error."""

from __future__ import annotations

import subprocess

import pytest

from megalite import cli
from megalite.config import ConfigError, ParallelConfig
from megalite.parallel.pipeline import SCHEDULE_FNS, check_schedule, resolve_schedule
from megalite.parallel.state import ParallelState
from megalite.training.forward_backward import get_forward_backward
from tests.test_cli import _check_one_line_error
from tests.training.common import TINY


@pytest.mark.parametrize("schedule,vpp,runs", [
    (None, 2, "interleaved"),  # the default (1f1b)
    ("1f1b", 2, "interleaved"),
    ("1f1b", 3, "interleaved"),
    ("interleaved", 2, "interleaved"),
    (None, 1, "1f1b"),
    ("1f1b", 1, "1f1b"),
    ("afab", 1, "afab"),
])
def test_schedule_resolves_to_interleaved_with_virtual_stages(schedule, vpp, runs):
    par = ParallelConfig(pp=2, vpp=vpp) if schedule is None else ParallelConfig(pp=2, vpp=vpp, pipeline_schedule=schedule)
    assert resolve_schedule(par) == runs
    check_schedule(par, num_micro=4, num_layers=2 * vpp)  # accepted
    assert get_forward_backward(ParallelState(pp=2, vpp=vpp), par) is SCHEDULE_FNS[runs]


def test_afab_with_virtual_stages_is_rejected():
    with pytest.raises(ConfigError, match="parallel.vpp=2 needs the interleaved schedule .* not 'afab'"):
        check_schedule(ParallelConfig(pp=2, vpp=2, pipeline_schedule="afab"), 4, 4)
    with pytest.raises(ConfigError, match="not 'afab'"):
        get_forward_backward(ParallelState(pp=2, vpp=2), ParallelConfig(pp=2, vpp=2, pipeline_schedule="afab"))


def test_resolved_interleaved_keeps_its_micro_batch_rule():
    with pytest.raises(ConfigError, match="multiple of parallel.pp 2"):
        check_schedule(ParallelConfig(pp=2, vpp=2), 3, 4)


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.pipeline_schedule=afab"], "parallel.vpp=2 needs the interleaved schedule"),
    (["train.global_batch_size=6"], "micro-batch count per step (3 = "),  # the default now follows interleaved's rule
])
def test_cli_one_line_error(tmp_path, monkeypatch, capsys, overrides, expected):
    """The layout checks run before any process group exists, so WORLD_SIZE=2 alone reaches them."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    capsys.readouterr()
    code = cli.main(["pretrain", *TINY, f"train.run_dir={tmp_path}", "model.num_layers=4", "parallel.pp=2",
                     "parallel.vpp=2", *overrides])
    out, err = capsys.readouterr()
    _check_one_line_error(subprocess.CompletedProcess([], code, out, err), tmp_path, expected)
