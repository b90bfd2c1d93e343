from __future__ import annotations

import pytest

from megalite.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_size: 256\n  num_kv_heads: 2\ntrain:\n  seq_len: 64\n")
    cfg = load_config(f, ["model.num_layers=3", "optim.lr=3e-4", "parallel.sp=true", "data.path=[a, b]"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.kv_heads) == (256, 3, 2)
    assert cfg.optim.lr == 3e-4 and cfg.parallel.sp is True and cfg.data.path == ["a", "b"]
    assert cfg.train.seq_len == 64 and cfg.train.micro_batch_size == 1  # defaults kept


@pytest.mark.parametrize("override, message", [
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("parallel.sp=maybe", "expected true/false"),
    ("model.num_kv_heads=x", "expected an integer"),
    ("train", "not of the form"),
    ("model=3", "must be a mapping"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_llama_ffn_rule():
    cfg = load_config(None, ["model.hidden_size=4096", "model.ffn_multiple_of=256"])
    assert cfg.model.ffn_size == 11008  # Llama-2 7B
