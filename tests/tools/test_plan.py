"""tools/plan.py's figures (megalite/plan.py) against hand-computed Llama-3-8B values, and its
memory estimate against the peak of real CPU training steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megalite import plan
from megalite.config import load_config
from megalite.model.flops import param_count

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = ROOT / "examples" / "configs" / "llama3_8b.yaml"


def test_llama3_8b_hand_computed():
    cfg = load_config(LLAMA3_8B)
    m = cfg.model
    # Per layer: q and o 4096x4096 each, k and v 4096x1024 each, SwiGLU 3 x 4096x14336, two norms.
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000
    embedding = 128256 * 4096  # untied: once for the embedding, once for the head
    assert param_count(m) == 32 * layer + 2 * embedding + 4096 == 8_030_261_248
    # Training FLOPs per token: 6 x non-embedding params (head included) + 12 L h s attention.
    per_token = 6 * (8_030_261_248 - 525_336_576) + 12 * 32 * 4096 * 8192
    assert per_token == 57_914_449_920
    assert plan.training_flops(m, 8192, 15e12) == pytest.approx(57_914_449_920 * 15e12, rel=1e-12)
    # Chinchilla: 20 tokens per parameter, and L(N, D) with Hoffmann et al.'s constants.
    assert plan.chinchilla_tokens(8_030_261_248) == pytest.approx(160_605_224_960)
    # 1.69 + 406.4 / 8.030e9^0.34 + 410.7 / 1.5e13^0.28 (by hand: 0.17465 + 0.08369)
    assert plan.chinchilla_loss(8_030_261_248, 15e12) == pytest.approx(1.69 + 0.174650 + 0.083686, abs=2e-4)
    # Time: FLOPs / (16 GPUs x 989.4 TFLOP/s x 40% MFU).
    ideal = 57_914_449_920 * 15e12 / (16 * 989.4e12 * 0.4)
    assert ideal / 86400 == pytest.approx(1587.9, abs=0.1)


def test_llama3_8b_memory_hand_computed():
    m = load_config(LLAMA3_8B).model
    lay = plan.Layout(tp=2, dp=8, sp=True, zero1=True)
    mem = plan.memory(m, lay, seq_len=8192, micro_batch=1, num_micro=64)
    params = 32 * 218_112_000 / 2 + 2 * 128256 * 4096 / 2 + 4096  # TP halves layers, embedding and head
    assert mem.weights == 4 * params and mem.grads == 4 * params  # fp32 parameters and grad buffer
    assert mem.optimizer == 8 * params / 8  # Adam m, v sharded over dp=8
    # megalite's per-token layer count (docs/plan.md), t=2 with SP: the norms 2(2h+1)/t, the full
    # qkv and gate_up inputs 2h, (3h + 4f + heads)/t, and 3 kv*d/t for the kv heads.
    per_token_layer = 2 * (2 * 4096 + 1) / 2 + 2 * 4096 + (3 * 4096 + 4 * 14336 + 32) / 2 + 3 * 8 * 128 / 2
    assert per_token_layer == 52_753
    head = 2 * 4096 + 1 + 4096 + 2 * 128256 / 2  # final norm, head input, logits and their grad (fp32)
    assert mem.activations == 8192 * (2 * per_token_layer * 32 + 4 * head)
    # Full recompute keeps each layer's input (x and the pending MLP output, /t under SP) plus one layer.
    full = plan.memory(m, plan.Layout(tp=2, dp=8, sp=True, zero1=True, recompute="full"), 8192, 1, 64)
    assert full.activations == 8192 * (2 * (2 * 4096 / 2 * 32 + per_token_layer) + 4 * head)
    # Korthikanti et al.'s original GPT formulas on the same shape: sbh(34 + 5as/h) and with TP+SP.
    sbh = 8192 * 1 * 4096
    assert plan.korthikanti_layer_bytes(8192, 1, 4096, 32) == sbh * (34 + 5 * 32 * 8192 / 4096) == sbh * 354
    assert plan.korthikanti_layer_bytes(8192, 1, 4096, 32, t=2, sp=True) == sbh * (17 + 160)
    assert plan.korthikanti_layer_bytes(8192, 1, 4096, 32, t=2, sp=True, recompute="selective") == sbh * 17
    # Pipeline: 1F1B holds pp micro-batches on the first stage; interleaving adds (pp-1)/(pp*vpp).
    assert plan.in_flight(4, 1, 64) == 4 and plan.in_flight(4, 1, 2) == 2
    assert plan.in_flight(4, 5, 64) == pytest.approx(4 * (1 + 3 / 20))


def test_picks_the_fastest_layout_that_fits():
    cfg = load_config(LLAMA3_8B)
    cands = plan.candidates(cfg.model, cfg.train, 16, 80.0, 989.4, 0.4, 15e12)
    pick = plan.best(cands)
    assert pick is not None and pick.fits
    assert all(c.seconds >= pick.seconds for c in cands if c.fits)
    assert not plan.best(plan.candidates(cfg.model, cfg.train, 1, 80.0, 989.4, 0.4, 15e12))  # 8B on one GPU
    # Slower layouts are slower for a reason: recomputation and the pipeline bubble cost time.
    t = {(c.layout.pp, c.layout.recompute): c.seconds for c in cands if c.layout.tp == 2 and c.layout.vpp == 1}
    assert t[(1, "none")] < t[(1, "selective")] < t[(1, "full")] and t[(1, "none")] < t[(2, "none")]


def test_cli_prints_plan():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(LLAMA3_8B),
                          "--tokens", "15e12", "--gpu", "H100", "--gpus", "16", "--mfu", "0.4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8,030,261,248" in out.stdout and "pick: " in out.stdout and "1.606e+11" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(LLAMA3_8B),
                          "--tokens", "1e9", "--gpu", "X9", "--gpus", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: unknown GPU 'X9' (known: "
                                                                       + ", ".join(plan.GPUS) + ")"]


MID = ["model.vocab_size=512", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
       "model.num_kv_heads=4", "model.ffn_hidden_size=1536", "train.seq_len=256", "train.micro_batch_size=4",
       "train.global_batch_size=4"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
@pytest.mark.parametrize("name, overrides", [("tiny", ["model.vocab_size=512"]), ("mid", MID)])
def test_memory_estimate_matches_cpu_peak(name, overrides):
    """The estimate (fp32 activations on CPU) within 15% of the measured resident peak of two real
    training steps (megalite/plan_measure.py says how it is measured)."""
    from megalite.plan_measure import measure

    config = str(ROOT / "examples" / "configs" / "tiny.yaml")
    got = measure(config, overrides)
    cfg = load_config(config, overrides)
    est = plan.memory(cfg.model, plan.Layout(), cfg.train.seq_len, cfg.train.micro_batch_size,
                      got["num_micro"], act_bytes=4)
    assert est.activations > est.weights + est.grads + est.optimizer or name == "mid"  # activations matter
    assert est.total == pytest.approx(got["peak_bytes"], rel=0.15), (est, got)
