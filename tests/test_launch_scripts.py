"""Every launch script's config loads and its layout passes the checks a run makes at start, at the
world size the script launches (Slurm: --nodes x --gpus-per-node; torchrun: its defaults)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megalite.config import load_config
from megalite.parallel.pipeline.stages import split_layers
from megalite.parallel.state import check_layout
from megalite.training.build import check_step_schedule

ROOT = Path(__file__).resolve().parents[1]
SBATCH = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
TORCHRUN = sorted((ROOT / "examples").glob("torchrun_*.sh"))


def _default(text: str, var: str) -> str | None:
    m = re.search(rf"^{var}=\$\{{{var}:-([^}}]+)\}}", text, re.M) or re.search(rf"^{var}=(\S+)", text, re.M)
    return m.group(1) if m and not m.group(1).startswith("${1") else None  # ${1:?...}: an argument


def _world(text: str) -> int:
    if "#SBATCH" in text:
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
        return nodes * int(re.search(r"^#SBATCH --gpus-per-node=(?:\w+:)?(\d+)", text, re.M).group(1))
    nnodes = int(_default(text, "NNODES") or 1)
    nproc = _default(text, "NPROC_PER_NODE")
    return nnodes * int(re.search(r"print \(\$1 > 0\) \? \$1 : (\d+)", nproc).group(1) if "nvidia-smi" in nproc
                        else nproc)


def _check(config: Path, world: int, stage: str) -> int:
    cfg = load_config(config)
    dp = check_layout(cfg.model, cfg.parallel, cfg.train, world)
    check_step_schedule(cfg, dp)
    split_layers(cfg.model.num_layers, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.pp_layer_split)
    if stage in ("grpo", "ppo"):  # the rollout's own start-up checks (megalite/alignment/rollout.py)
        assert not cfg.parallel.sp and cfg.parallel.vpp == 1
        assert (cfg.train.global_batch_size // dp) % cfg.rl.group_size == 0
        assert bool(cfg.reward.function) != bool(cfg.reward.model)
    return dp


EXPECTED = {  # script: (stage, config, world size, dp)
    "llama3_8b_pretrain.sbatch": ("pretrain", "llama3_8b.yaml", 16, 8),
    "llama3_70b_pretrain.sbatch": ("pretrain", "llama3_70b.yaml", 64, 2),
    "sft.sbatch": ("sft", "sft_llama3_8b.yaml", 8, 4),
    "dpo.sbatch": ("dpo", "dpo_llama3_8b.yaml", 8, 4),
    "grpo.sbatch": ("grpo", "grpo_llama3_8b.yaml", 16, 8),
    "torchrun_single_node.sh": ("pretrain", "llama3_8b.yaml", 8, 4),
    "torchrun_multi_node.sh": ("pretrain", "llama3_8b.yaml", 16, 8),
}


@pytest.mark.parametrize("script", [*SBATCH, *TORCHRUN], ids=lambda p: p.name)
def test_script_config_fits_its_world_size(script):
    text = script.read_text()
    config = _default(text, "CONFIG")
    if config is None:  # pretrain.sbatch takes the config as its first argument
        assert script.name == "pretrain.sbatch"
        config, stage = "examples/configs/llama3_8b.yaml", "pretrain"
    else:
        stage = _default(text, "STAGE")
    world = _world(text)
    dp = _check(ROOT / config, world, stage)
    if script.name in EXPECTED:
        assert (stage, Path(config).name, world, dp) == EXPECTED[script.name]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if "#SBATCH" in text:  # preemption: the signal ahead of the limit, and the job may be requeued
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M) and "#SBATCH --requeue" in text


def test_llama3_70b_layout_is_tp8_pp4_interleaved():
    cfg = load_config(ROOT / "examples" / "configs" / "llama3_70b.yaml")
    p = cfg.parallel
    assert (p.tp, p.pp, p.vpp, p.sp) == (8, 4, 5, True)
    assert [len(s) for s in split_layers(80, 4, 5)] == [4] * 20


def test_every_script_is_checked():
    assert {p.name for p in [*SBATCH, *TORCHRUN]} >= set(EXPECTED)
    assert (ROOT / "examples" / "slurm" / "common.sh").is_file()
