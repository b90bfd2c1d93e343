"""Checkpoints: the per-rank distributed format with save/load (`dist`), resharding across TP/PP/DP
layouts (`reshard`), whole-model weights for conversion (`global_weights`), stored names (`names`)."""
