"""The layout-independent part of checkpoints: what each rank saves, the index of it, and how a
parameter (or a piece of its optimizer state) is rebuilt for another TP/PP/DP layout.

Parameters are keyed by their global names (layer numbers are global, so PP does not matter),
as the torch layer spec names them: a Transformer Engine parameter (e.g. `mlp.te.fc1_weight`) is
stored as its torch counterpart (`mlp.gate_up.weight`), the same tensor, so either spec resumes
the other's checkpoints.
A TP-sharded parameter is stored as each TP rank's local tensor plus its `TPShard`, which says how
to reassemble the global (TP=1) tensor; the loader re-splits that for its own TP rank. Optimizer
state is stored as pieces [lo, hi) of each TP-local tensor, flattened: the whole tensor without the
distributed optimizer, a DP rank's slice with it; the loader stitches the pieces together first.
A tied head on the last pipeline stage duplicates `embedding.weight` and is not stored.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn

from megalite.checkpoint.names import canonical_name
from megalite.config import ConfigError
from megalite.parallel.sharding import (
    TPShard,
    assemble_global,
    get_tp_shard,
    is_tied_copy,
    split_for_rank,
    tied_copy_of,
)
from megalite.parallel.state import ParallelState

OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "master")


def storage_key(name: str, p: nn.Parameter, ps: ParallelState) -> str | None:
    """The name a parameter is stored under; None for a tied head (stored as the embedding)."""
    return None if is_tied_copy(p, ps) else canonical_name(name)


def load_key(name: str, p: nn.Parameter, ps: ParallelState, meta: dict) -> str:
    """The stored name a parameter loads from: its own, or for a tied head the embedding's. A TE
    parameter saved before names were canonical is found under its own TE name."""
    key = storage_key(name, p, ps) or tied_copy_of(p)
    return name if key not in meta["params"] and name in meta["params"] else key


def global_shape(p: torch.Tensor) -> list[int]:
    shape, shard = list(p.shape), get_tp_shard(p)
    if shard is not None:
        shape[shard.dim] = shard.logical or shard.global_size
    return shape


def shard_to_json(shard: TPShard | None) -> dict | None:
    if shard is None:
        return None
    d = asdict(shard)
    d["blocks"] = list(shard.blocks)
    d["replicated"] = list(shard.replicated) if shard.replicated else None
    return d


def shard_from_json(d: dict | None) -> TPShard | None:
    if d is None:
        return None
    return TPShard(d["dim"], tuple(d["blocks"]), d["logical"],
                   tuple(d["replicated"]) if d["replicated"] is not None else None)


def local_for(full: torch.Tensor, p: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    shard = get_tp_shard(p)
    return split_for_rank(full, shard, ps.tp_rank, ps.tp) if shard is not None else full


# ---------------------------------------------------------------------------------------------
# Saving: this rank's payload and its index entry


def rank_payload(chunks: list[nn.Module], optimizer: Any, ps: ParallelState,
                 trainable_only: bool = False) -> tuple[dict, dict]:
    """(tensors to write, their index). Tensors are cloned: a view would serialize its whole buffer,
    and an async save must not see later updates. `trainable_only`: frozen parameters are left out
    (a LoRA checkpoint points to the base that holds them)."""
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, list[dict]] = {}
    index: dict[str, dict] = {}
    for c in chunks:
        for name, p in c.named_parameters():
            key = storage_key(name, p, ps)
            if key is None or (trainable_only and not p.requires_grad):
                continue
            index[key] = {"shape": global_shape(p), "local_shape": list(p.shape), "dtype": str(p.dtype),
                          "tp_shard": shard_to_json(get_tp_shard(p)), "weight": ps.dp_rank == 0, "optim": []}
            if ps.dp_rank == 0:  # parameters are replicated over DP: one copy is enough
                model[key] = p.detach().to("cpu", copy=True)
    pieces = getattr(optimizer, "pieces", None)
    if pieces is not None:
        sharded = getattr(optimizer, "sharded", False)
        for pc in pieces:
            key = storage_key(pc.name, pc.slot.param, ps)
            if key is None or (not sharded and ps.dp_rank != 0):
                continue
            state = {k: v.to("cpu", copy=True) for k, v in optimizer.piece_state(pc).items()}
            optim.setdefault(key, []).append({"lo": pc.lo, "hi": pc.hi, **state})
            index[key]["optim"].append([pc.lo, pc.hi])
    return {"model": model, "optim": optim}, index


def merge_index(per_rank: list[dict]) -> dict[str, dict]:
    """Rank 0 combines every rank's index into the metadata's `params` table."""
    params: dict[str, dict] = {}
    for r in per_rank:
        for key, e in r["params"].items():
            m = params.setdefault(key, {"shape": e["shape"], "dtype": e["dtype"], "tp_shard": e["tp_shard"],
                                        "local_shape": e["local_shape"], "weights": {}, "optim": {}})
            t = str(r["tp_rank"])
            if e["weight"]:
                m["weights"][t] = r["file"]
            for lo, hi in e["optim"]:
                m["optim"].setdefault(t, []).append([r["file"], lo, hi])
    return params


# ---------------------------------------------------------------------------------------------
# Loading


class ShardReader:
    """Opens each rank file at most once (memory-mapped) and turns read errors into ConfigError."""

    def __init__(self, step_dir) -> None:
        self.dir = step_dir
        self.files: dict[str, dict] = {}

    def get(self, fname: str) -> dict:
        if fname not in self.files:
            path = self.dir / fname
            if not path.is_file():
                raise ConfigError(f"{path}: checkpoint shard is missing")
            try:
                self.files[fname] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
                raise ConfigError(f"{path}: cannot read checkpoint shard ({type(e).__name__})") from None
        return self.files[fname]


def _entry(meta: dict, key: str, p: torch.Tensor, where: str) -> dict:
    e = meta["params"].get(key)
    if e is None:
        raise ConfigError(f"{where}: parameter '{key}' is not in the checkpoint (incompatible model)")
    if e["shape"] != global_shape(p):
        raise ConfigError(f"{where}: parameter '{key}' has global shape {e['shape']} in the checkpoint, "
                          f"the model expects {global_shape(p)}")
    return e


def _old_tp(meta: dict) -> int:
    return int(meta["layout"]["tp"])


def global_weight(reader: ShardReader, meta: dict, key: str) -> torch.Tensor:
    """The global (TP=1) tensor of parameter `key`, reassembled from the saved TP ranks' shards."""
    where = str(reader.dir)
    e = meta["params"].get(key)
    if e is None:
        raise ConfigError(f"{where}: parameter '{key}' is not in the checkpoint (incompatible model)")
    tp_old = _old_tp(meta) if e["tp_shard"] is not None else 1
    locals_ = []
    for t in range(tp_old):
        fname = e["weights"].get(str(t))
        if fname is None:
            raise ConfigError(f"{where}: no weights of '{key}' for TP rank {t} in the checkpoint")
        tensor = reader.get(fname)["model"].get(key)
        if tensor is None:
            raise ConfigError(f"{reader.dir / fname}: '{key}' is missing from the shard")
        if "local_shape" in e and list(tensor.shape) != list(e["local_shape"]):  # shard vs its own metadata
            raise ConfigError(f"{reader.dir / fname}: tensor '{key}' is stored with shape {list(tensor.shape)}, "
                              f"the checkpoint metadata says {list(e['local_shape'])}")
        locals_.append(tensor)
    return assemble_global(locals_, shard_from_json(e["tp_shard"]))


def load_weight(reader: ShardReader, meta: dict, key: str, p: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """This rank's slice of `key` for the local parameter `p` (its global shape checked first)."""
    _entry(meta, key, p, str(reader.dir))
    return local_for(global_weight(reader, meta, key), p, ps)


def load_optim_state(reader: ShardReader, meta: dict, key: str, p: torch.Tensor, ps: ParallelState,
                     name: str) -> torch.Tensor | None:
    """The optimizer tensor `name` for this rank's whole TP-local `p`, flattened (None if absent)."""
    where = str(reader.dir)
    e = _entry(meta, key, p, where)
    if not e["optim"]:
        return None  # saved without optimizer state (e.g. converted from HF)
    tp_old = _old_tp(meta) if e["tp_shard"] is not None else 1
    local_shape = e["local_shape"]
    numel = 1
    for d in local_shape:
        numel *= d
    locals_ = []
    for t in range(tp_old):
        pieces = e["optim"].get(str(t), [])
        flat = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for fname, lo, hi in pieces:
            stored = next((s for s in reader.get(fname)["optim"].get(key, []) if s["lo"] == lo), None)
            if stored is None or name not in stored:
                return None if name == "master" else _missing(reader, fname, key, name)
            flat[lo:hi] = stored[name]
            covered += hi - lo
        if covered != numel:
            raise ConfigError(f"{where}: optimizer state of '{key}' (TP rank {t}) covers {covered} of "
                              f"{numel} elements")
        locals_.append(flat.view(local_shape))
    return local_for(assemble_global(locals_, shard_from_json(e["tp_shard"])), p, ps).reshape(-1)


def _missing(reader: ShardReader, fname: str, key: str, name: str):
    raise ConfigError(f"{reader.dir / fname}: optimizer state '{name}' of '{key}' is missing")
