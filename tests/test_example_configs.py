"""Every shipped config loads, and its intended layout is valid for the model at its world size."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite.config import load_config
from megalite.model.flops import param_count
from megalite.parallel.state import check_layout

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


@pytest.mark.parametrize("name, world, params_b", [
    ("llama3_1b.yaml", 8, 1.24), ("llama3_8b.yaml", 16, 8.03), ("llama3_70b.yaml", 64, 70.6),
])
def test_llama3_configs(name, world, params_b):
    cfg = load_config(CONFIGS / name)
    dp = check_layout(cfg.model, cfg.parallel, cfg.train, world)
    assert dp == world // (cfg.parallel.tp * cfg.parallel.pp)
    assert param_count(cfg.model) / 1e9 == pytest.approx(params_b, rel=0.01)


def test_all_configs_load():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 4, files  # tiny + the three Llama-3 shapes
    for f in files:
        load_config(f)
