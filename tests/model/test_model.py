"""Model-level properties that do not need several processes."""

from __future__ import annotations

import math

import torch

from megalite.config import ModelConfig
from megalite.model import LlamaModel
from megalite.model.flops import flops_per_token, param_count
from megalite.model.rope import inv_frequencies
from megalite.parallel.state import ParallelState
from megalite.training.batch import make_micro_batch

CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, max_seq_len=64)


def _model(cfg: ModelConfig = CFG) -> LlamaModel:
    torch.manual_seed(0)
    m = LlamaModel(cfg, ParallelState())
    m.init_weights(3)
    return m.eval()


def test_packed_documents_equal_separate_documents():
    eod = 299
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(0, 298, (1, 7), generator=g), torch.randint(0, 298, (1, 9), generator=g)
    window = torch.cat([a, torch.tensor([[eod]]), b, torch.tensor([[5]])], dim=1)  # 18 = seq 17 + 1
    packed = make_micro_batch(window, eod, reset_at_eod=True, eod_mask_loss=False, device=torch.device("cpu"))
    assert packed["position_ids"][0].tolist() == list(range(8)) + list(range(9))
    m = _model()
    with torch.no_grad():
        out = m(packed["tokens"], labels=packed["labels"], position_ids=packed["position_ids"],
                doc_ids=packed["doc_ids"])
        first = m(window[:, :8], labels=window[:, 1:9])
        second = m(window[:, 8:17], labels=window[:, 9:18])
    torch.testing.assert_close(out, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_without_reset_documents_attend_across_eod():
    eod = 299
    g = torch.Generator().manual_seed(12)
    first, second = torch.randint(0, 298, (1, 6), generator=g), torch.randint(0, 298, (1, 6), generator=g)
    window = torch.cat([first, torch.tensor([[eod]]), second], 1)
    mb = make_micro_batch(window, eod, reset_at_eod=False, eod_mask_loss=True, device=torch.device("cpu"))
    assert mb["doc_ids"] is None and mb["position_ids"] is None
    assert mb["labels"][0, 6] == -100  # the label after EOD is masked with eod_mask_loss
    m = _model()
    with torch.no_grad():
        packed = m(mb["tokens"], labels=mb["labels"])
        alone = m(window[:, 7:-1], labels=window[:, 8:])
    # The second document's tokens see the first: their losses differ from running it alone.
    assert not torch.allclose(packed[:, 7:], alone, atol=1e-4)


def test_param_count_matches_module():
    for cfg in (CFG, ModelConfig(**{**CFG.__dict__, "tie_embeddings": True, "qk_norm": True})):
        m = _model(cfg)
        padded = m.vocab_padded - cfg.vocab_size
        heads = 1 if cfg.tie_embeddings else 2
        assert param_count(cfg) == sum(p.numel() for p in m.parameters()) - heads * padded * cfg.hidden_size


def test_flops_per_token_is_6n_plus_attention():
    n = param_count(CFG, include_embedding=False)
    assert flops_per_token(CFG, 32) == 6 * n + 12 * 2 * 64 * 32


def test_llama3_rope_scaling():
    base = ModelConfig(hidden_size=4096, num_heads=32, rope_theta=500000.0)
    scaled = ModelConfig(**{**base.__dict__, "rope_scaling": "llama3"})
    f0, f1 = inv_frequencies(base), inv_frequencies(scaled)
    wavelen = 2 * math.pi / f0
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    torch.testing.assert_close(f1[high], f0[high])  # short wavelengths untouched
    torch.testing.assert_close(f1[low], f0[low] / 8.0)  # long ones slowed by the factor
    mid = ~(high | low)
    assert mid.any() and bool(((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8.0)).all())


def test_init_is_megatron_style():
    m = _model(ModelConfig(**{**CFG.__dict__, "num_layers": 8, "hidden_size": 256, "ffn_hidden_size": 512}))
    std = m.layers["0"].attn.qkv.weight.std().item()
    scaled = m.layers["0"].mlp.down.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(scaled - 0.02 / math.sqrt(16)) < 0.001
    assert torch.all(m.layers["0"].attn_norm.weight == 1)
