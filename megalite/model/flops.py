"""Parameter and FLOP counts for MFU (global model, independent of the parallel layout)."""

from __future__ import annotations

from megalite.config import ModelConfig


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    attn = h * (cfg.num_heads * d) + 2 * h * (cfg.kv_heads * d) + (cfg.num_heads * d) * h
    if cfg.qk_norm:
        attn += 2 * d
    layer = attn + 3 * h * f + 2 * h
    n = cfg.num_layers * layer + h  # + final norm
    emb = cfg.vocab_size * h
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    return n + head + (emb if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters, head included, embedding excluded) plus the
    attention score/value products, 12 * layers * hidden * seq (no causal discount: the convention
    of torchtitan and PaLM, so MFU numbers compare directly)."""
    n = param_count(cfg, include_embedding=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # the head matmul still runs
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
