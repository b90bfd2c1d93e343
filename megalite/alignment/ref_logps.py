"""DPO's precomputed reference log-probs: one forward-only pass of the frozen reference over a whole
preference split before training, stored beside the data and reused by later runs.

The file `<data.cache_dir>/ref_logps/<split>-<key>.npy` holds [pairs, 2] float32 (chosen, rejected)
indexed by pair id (`mb["pair_ids"]`, stable across epochs). The key hashes the reference
checkpoint (its step directory and the identity of its files), the split's pairs (shards, rows,
lengths, seq_len) and the precision, so a changed reference or data set computes afresh. DP ranks
split the pairs, the last pipeline stage holds the results, and a sum over DP plus a broadcast
over the pipeline gives every rank the whole table; rank 0 writes it atomically.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megalite.alignment.frozen import sequence_logps
from megalite.atomic import atomic_write
from megalite.data.cache import params_hash
from megalite.parallel.comm import all_reduce, broadcast

VERSION = 1


def checkpoint_identity(step_dir: Path) -> dict:
    """What the reference's weights depend on: the step directory and every file's size and mtime."""
    files = sorted(p for p in Path(step_dir).rglob("*") if p.is_file())
    return {"dir": os.path.abspath(step_dir),
            "files": [[str(p.relative_to(step_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def split_identity(ds) -> dict:
    """What a split's pairs are: its shards and the (shard, sequence, lengths) of every pair."""
    digest = hashlib.sha256()
    for a in (ds.unit_shard, ds.unit_seq, ds.unit_len):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {"name": ds.name, "shards": [sh.ident() for sh in ds.shards], "seq_len": ds.seq_len,
            "units": digest.hexdigest()}


def cache_path(trainer, ds, ref_step_dir: Path) -> Path:
    root = Path(trainer.cfg.data.cache_dir or Path(trainer.cfg.train.run_dir) / "cache")
    key = params_hash({"version": VERSION, "ref": checkpoint_identity(ref_step_dir), "data": split_identity(ds),
                       "precision": trainer.precision, "vocab": trainer.cfg.model.vocab_size})
    return root / "ref_logps" / f"{ds.name}-{key}.npy"


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True only if every rank says so (a collective: nobody writes before everybody has looked)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def compute_table(trainer, ref_chunks, ds) -> np.ndarray:
    """[pairs, 2] reference sequence log-probs of every pair of `ds`, on every rank."""
    ps, mbs = trainer.ps, trainer.cfg.train.micro_batch_size
    n = len(ds)
    table = torch.zeros((n, 2), dtype=torch.float64, device=trainer.device)
    count = math.ceil(n / mbs)
    mine = list(range(ps.dp_rank, count, ps.dp))  # this DP rank's micro-batches
    group = max(1, trainer.num_micro)
    for start in range(0, len(mine), group):
        batches = []
        for j in mine[start : start + group]:
            # Wrapping past the end keeps every micro-batch the same shape (pipeline buffers);
            # only the first n rows are stored, so each pair is written by one rank exactly once.
            ks = [k % n for k in range(j * mbs, (j + 1) * mbs)]
            mb = ds.get_batch(ks)
            mb["keep"] = min(mbs, n - j * mbs)
            batches.append({k: v.to(trainer.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()})
        sequence_logps(ref_chunks, batches, ps, trainer.cfg.parallel, autocast=trainer.autocast)
        if ps.pp_rank == ps.pp - 1:
            for mb in batches:
                keep, b = mb["keep"], len(mb["pair_ids"])
                rows = mb["ref_logps"].double()
                table[mb["pair_ids"][:keep], 0] = rows[:b][:keep]
                table[mb["pair_ids"][:keep], 1] = rows[b:][:keep]
    all_reduce(table, ps.dp_group)
    broadcast(table, src=ps.pp_ranks[-1], group=ps.pp_group)
    return table.float().cpu().numpy()


def load_or_compute(trainer, ds, ref_step_dir: Path, build_ref) -> tuple[np.ndarray, Path, bool]:
    """(the table, its file, whether it was computed now). `build_ref()` builds the frozen reference
    only when the file is missing on some rank."""
    path = cache_path(trainer, ds, ref_step_dir)
    if _all_agree(path.is_file(), trainer.device):
        table = np.load(path)
        if table.shape == (len(ds), 2):
            return table, path, False
    table = compute_table(trainer, build_ref(), ds)
    if trainer.ps.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, table)

        atomic_write(path, write)
    return table, path, True
