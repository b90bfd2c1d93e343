"""Checkpoints: resharding across layouts, atomicity under a kill, retention, async, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import dist as ckpt
from megalite.checkpoint import reshard as checkpoint_reshard
from megalite.checkpoint.global_weights import load_global_weights, save_global_weights
from megalite.checkpoint.names import canonical_name
from megalite.config import Config, ConfigError, ModelConfig
from megalite.model import LlamaModel
from megalite.parallel.distributed_optimizer import BufferOptimizer
from megalite.parallel.sharding import TPShard, assemble_global, split_for_rank
from megalite.parallel.state import ParallelState
from megalite.testing import run_distributed
from megalite.training.trainer import Trainer
from tests.training.common import tiny_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(vocab_size=301, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=64, max_seq_len=32, tie_embeddings=True)


def _tiny(model: ModelConfig = MODEL, **ck) -> tuple[Config, LlamaModel, BufferOptimizer]:
    cfg = Config(model=model)
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    m = LlamaModel(model, ParallelState())
    m.init_weights(1)
    return cfg, m, BufferOptimizer([m], cfg.optim, ParallelState(), bucket_size_mb=0.004)


def _train(m: LlamaModel, opt: BufferOptimizer, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.randint(0, 301, (2, 8), generator=g), labels=torch.randint(0, 301, (2, 8), generator=g)).mean().backward()
        opt.step(1e-2)


def _same_state(a: tuple, b: tuple) -> None:
    (_, m1, o1), (_, m2, o2) = a, b
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for x, y in zip(o1.exp_avg + o1.exp_avg_sq, o2.exp_avg + o2.exp_avg_sq, strict=True):
        assert torch.equal(x, y)
    assert o1.steps == o2.steps


# -- the global <-> local mapping -----------------------------------------------------------------

@pytest.mark.parametrize("shard", [TPShard(0, (12, 4, 4), replicated=(False, True, True)),
                                   TPShard(1, (8,)), TPShard(0, (16,), logical=13)])
def test_assemble_inverts_split_for_any_tp(shard: TPShard):
    shape = [shard.logical or shard.global_size, 3]
    if shard.dim == 1:
        shape.reverse()
    full = torch.randn(shape)
    for tp in (1, 2, 4):
        rep = shard if tp > 1 else TPShard(shard.dim, shard.blocks, shard.logical)
        locals_ = [split_for_rank(full, rep, r, tp) for r in range(tp)]
        assert torch.equal(assemble_global(locals_, rep), full)


# -- atomicity, retention, async, bad input -------------------------------------------------------

def test_retention_keeps_last_k_and_powers_of_two(tmp_path):
    assert ckpt.retained_steps(list(range(1, 21)), 3, True) == {1, 2, 4, 8, 16, 18, 19, 20}
    assert ckpt.retained_steps(list(range(1, 21)), 2, False) == {19, 20}
    cfg, m, opt = _tiny(keep_last=2, keep_pow2=True)
    for step in (3, 4, 5, 6, 7):
        ckpt.save_checkpoint(tmp_path, step, [m], opt, ParallelState(), cfg, {"consumed_samples": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000006",
                                                           "step_00000007"]
    assert (tmp_path / "latest").read_text() == "step_00000007"


_KILLED_SAVE = """
import sys, time, pathlib
from tests.training.test_checkpoint import _tiny, _train
from megalite.parallel.state import ParallelState
from megalite.checkpoint import dist as ckpt
root = pathlib.Path(sys.argv[1])
cfg, m, opt = _tiny()
_train(m, opt)
ckpt.save_checkpoint(root, 2, [m], opt, ParallelState(), cfg, {"consumed_samples": 2})
_train(m, opt, 1)
def hang(tmp):
    (root / "marker").write_text(str(tmp))
    time.sleep(120)
ckpt._before_commit = hang
ckpt.save_checkpoint(root, 3, [m], opt, ParallelState(), cfg, {"consumed_samples": 3})
"""


def test_killed_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "marker").exists():
        assert proc.poll() is None and time.time() < deadline, "the saving process ended early"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # all rank files are written, the commit is not
    proc.wait()
    assert (tmp_path / ".tmp_step_00000003" / "rank_00000.pt").is_file()
    assert (tmp_path / "latest").read_text() == "step_00000002"
    assert not (tmp_path / "step_00000003").exists()
    # The previous checkpoint loads and equals what the killed process had at step 2.
    expected = _tiny()
    _train(expected[1], expected[2])
    loaded = _tiny()
    meta = ckpt.load_checkpoint(tmp_path, [loaded[1]], loaded[2], ParallelState(), loaded[0])
    assert meta["step"] == 2 and meta["consumed_samples"] == 2
    _same_state(expected, loaded)
    # The next save cleans up the half-written directory.
    ckpt.save_checkpoint(tmp_path, 3, [loaded[1]], loaded[2], ParallelState(), loaded[0], {"consumed_samples": 3})
    assert not (tmp_path / ".tmp_step_00000003").exists()


def test_resaving_a_step_never_deletes_the_checkpoint_latest_names(tmp_path, monkeypatch):
    cfg, m, opt = _tiny()
    ckpt.save_checkpoint(tmp_path, 3, [m], opt, ParallelState(), cfg, {"consumed_samples": 3})
    _train(m, opt, 1)
    real_rmtree = ckpt.shutil.rmtree
    deleted = []

    def checked_rmtree(path, *args, **kwargs):  # after any delete, `latest` must name a complete checkpoint
        real_rmtree(path, *args, **kwargs)
        deleted.append(Path(path).name)
        assert ckpt.resolve_checkpoint(tmp_path) is not None

    monkeypatch.setattr(ckpt.shutil, "rmtree", checked_rmtree)
    ckpt.save_checkpoint(tmp_path, 3, [m], opt, ParallelState(), cfg, {"consumed_samples": 4})
    assert deleted == [".tmp_step_00000003.old"]  # the replaced directory, moved aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
    loaded = _tiny()
    assert ckpt.load_checkpoint(tmp_path, [loaded[1]], loaded[2], ParallelState(), loaded[0])["consumed_samples"] == 4
    _same_state((cfg, m, opt), loaded)


def test_async_save_commits_the_snapshot_taken_at_call_time(tmp_path):
    cfg, m, opt = _tiny(async_save=True)
    _train(m, opt)
    snapshot = _tiny()
    for (_, p), (_, q) in zip(snapshot[1].named_parameters(), m.named_parameters(), strict=True):
        p.data.copy_(q)
    snapshot[2].load_state_dict(opt.state_dict())
    ckpt.save_checkpoint(tmp_path, 2, [m], opt, ParallelState(), cfg, {"consumed_samples": 2})
    _train(m, opt, 1)  # training goes on while the background thread writes
    ckpt.wait_for_pending_save()
    loaded = _tiny()
    ckpt.load_checkpoint(tmp_path, [loaded[1]], loaded[2], ParallelState(), loaded[0])
    _same_state(snapshot, loaded)


def _disk_full(path, write):
    raise OSError(28, "No space left on device")


def test_async_save_failures_are_raised_on_the_main_thread(tmp_path, monkeypatch):
    cfg, m, opt = _tiny(async_save=True)
    monkeypatch.setattr(ckpt, "atomic_write", _disk_full)
    ckpt.save_checkpoint(tmp_path, 2, [m], opt, ParallelState(), cfg, {"consumed_samples": 2})  # returns at once
    with pytest.raises(ckpt.CheckpointSaveError,
                       match=r"checkpoint of step 2 \(.*step_00000002\) was not saved on rank 0: No space left on device"):
        ckpt.save_checkpoint(tmp_path, 3, [m], opt, ParallelState(), cfg, {"consumed_samples": 3})
    ckpt.wait_for_pending_save()  # reported once
    assert not (tmp_path / "latest").exists()
    monkeypatch.setattr(ckpt, "_COMMIT_TIMEOUT_S", 0.0)  # rank 0's commit no longer waits silently forever
    with pytest.raises(ckpt.CheckpointSaveError, match=r"waiting for the files of ranks \[0, 1\]"):
        ckpt._wait_for_rank_files(tmp_path, 2)


def test_bad_checkpoints_fail_with_one_line_naming_the_file(tmp_path):
    cfg, m, opt = _tiny()
    step_dir = ckpt.save_checkpoint(tmp_path, 1, [m], opt, ParallelState(), cfg, {"consumed_samples": 1})
    wider = ModelConfig(**{**MODEL.__dict__, "hidden_size": 64})
    c2, m2, o2 = _tiny(wider)
    with pytest.raises(ConfigError, match="model.hidden_size is 32 in the checkpoint but 64"):
        ckpt.load_checkpoint(tmp_path, [m2], o2, ParallelState(), c2)
    shard = step_dir / "rank_00000.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match=r"rank_00000\.pt: cannot read checkpoint shard"):
        ckpt.load_checkpoint(tmp_path, [m], opt, ParallelState(), cfg)
    shard.unlink()
    with pytest.raises(ConfigError, match=r"rank_00000\.pt: checkpoint shard is missing"):
        ckpt.load_checkpoint(tmp_path, [m], opt, ParallelState(), cfg)
    (step_dir / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"meta\.json: unreadable checkpoint metadata"):
        ckpt.load_checkpoint(step_dir, [m], opt, ParallelState(), cfg)


def test_malformed_saved_model_config_fails_with_one_line(tmp_path):
    cfg, m, opt = _tiny()
    step_dir = ckpt.save_checkpoint(tmp_path, 1, [m], opt, ParallelState(), cfg, {"consumed_samples": 1})
    meta = json.loads((step_dir / "meta.json").read_text())
    # A string where an int belongs (the effective FFN size used to raise TypeError computing it).
    meta["config"]["model"].update(ffn_hidden_size=None, ffn_multiple_of="64")
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"'model.ffn_multiple_of' in .*meta\.json: expected an integer, got '64'"):
        ckpt.load_checkpoint(tmp_path, [m], opt, ParallelState(), cfg)
    meta["config"]["model"] = ["not", "a", "mapping"]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"meta\.json: no model config in the checkpoint metadata"):
        ckpt.load_checkpoint(tmp_path, [m], opt, ParallelState(), cfg)


def test_global_weights_round_trip_as_a_weights_only_checkpoint(tmp_path):
    cfg, m, opt = _tiny()
    _train(m, opt)
    ckpt.save_checkpoint(tmp_path / "a", 2, [m], opt, ParallelState(), cfg, {"consumed_samples": 2})
    meta, weights = load_global_weights(tmp_path / "a")
    assert meta["step"] == 2 and set(weights) == {n for n, _ in m.named_parameters()}
    for n, p in m.named_parameters():  # global = local at TP1, minus the vocab padding rows
        assert torch.equal(weights[n], p.detach()[: weights[n].shape[0]]), n
    assert weights["embedding.weight"].shape[0] == 301
    save_global_weights(tmp_path / "b", 0, weights, cfg)
    c2, m2, o2 = _tiny()
    assert ckpt.load_checkpoint(tmp_path / "b", [m2], o2, ParallelState(), c2)["step"] == 0
    for (n, p), (_, q) in zip(m.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert o2.steps == 0 and all(not t.any() for t in o2.exp_avg)  # Adam starts fresh


# -- Transformer Engine layer spec ---------------------------------------------------------------

TE_MODEL = dataclasses.replace(MODEL, linear_impl="te", norm_impl="te", mlp_impl="te")


def _by_canonical_name(state: tuple) -> tuple[dict, dict]:
    _, m, opt = state
    weights = {canonical_name(n): p.detach().clone() for n, p in m.named_parameters()}
    optim = {(canonical_name(pc.name), pc.lo, k): v.clone() for pc in opt.pieces for k, v in opt.piece_state(pc).items()}
    return weights, optim


def _assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(_by_canonical_name(a), _by_canonical_name(b), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert a[2].steps == b[2].steps


@pytest.mark.parametrize("saved, loaded", [(TE_MODEL, MODEL), (MODEL, TE_MODEL)], ids=["te-to-torch", "torch-to-te"])
def test_checkpoints_store_torch_names_so_te_and_torch_specs_resume_each_other(tmp_path, monkeypatch, saved, loaded):
    from tests.kernels import fake_te

    fake_te.install(monkeypatch)
    src = _tiny(saved)
    _train(src[1], src[2])
    ckpt.save_checkpoint(tmp_path, 2, [src[1]], src[2], ParallelState(), src[0], {"consumed_samples": 2})
    meta = ckpt.read_metadata(tmp_path / "step_00000002")
    assert set(meta["params"]) == {n for n, _ in LlamaModel(MODEL, ParallelState()).named_parameters()}
    dst = _tiny(loaded)
    ckpt.load_checkpoint(tmp_path, [dst[1]], dst[2], ParallelState(), dst[0])
    _assert_same(src, dst)


def test_te_checkpoints_saved_under_te_names_still_load(tmp_path, monkeypatch):
    from tests.kernels import fake_te

    fake_te.install(monkeypatch)
    src = _tiny(TE_MODEL)
    _train(src[1], src[2])
    with monkeypatch.context() as old_format:
        old_format.setattr(checkpoint_reshard, "canonical_name", lambda name: name)
        ckpt.save_checkpoint(tmp_path, 2, [src[1]], src[2], ParallelState(), src[0], {"consumed_samples": 2})
    assert "layers.0.mlp.te.fc1_weight" in ckpt.read_metadata(tmp_path / "step_00000002")["params"]
    dst = _tiny(TE_MODEL)
    ckpt.load_checkpoint(tmp_path, [dst[1]], dst[2], ParallelState(), dst[0])
    _assert_same(src, dst)


# -- resharding through the real training loop -----------------------------------------------------

def _layout_worker(rank: int, world: int, run_dir: str, overrides: list[str]):
    history = Trainer(tiny_config(f"{run_dir}/r{rank}", *overrides)).train()
    return [r["loss"] for r in history], [r["grad_norm"] for r in history]


@pytest.mark.slow
def test_tp2_pp2_dp2_checkpoint_resumes_at_tp1_and_tp4_dp2(tmp_path):
    ck = str(tmp_path / "ckpt")
    # vocab 1001 pads to 1024 at TP4, so every TP rank holds some real vocabulary rows to reshard
    # (an all-padding slice is covered by tests/parallel/test_tensor_parallel.py).
    common = ["train.train_steps=4", "parallel.sp=true", f"checkpoint.dir={ck}", "model.vocab_size=1001"]
    # Saved at step 2 by TP2 x PP2 x DP2 with the distributed optimizer (small buckets, so DP
    # shards split parameters); it runs on to step 4.
    saved = run_distributed(_layout_worker, 8, str(tmp_path / "a"),
                            [*common, "parallel.tp=2", "parallel.pp=2", "parallel.distributed_optimizer=true",
                             "parallel.bucket_size_mb=0.03", "checkpoint.save_interval=2"])
    losses, norms = saved[0]
    assert all(r == saved[0] for r in saved)  # every rank logs the same global loss
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(ck))
    assert meta["step"] == 4 and meta["layout"]["distributed_optimizer"]
    load = [f"checkpoint.load={ck}/step_00000002"]
    # The global view reassembles TP2 x PP2 shards into whole tensors (tied-free model: head kept).
    _, weights = load_global_weights(f"{ck}/step_00000002")
    assert weights["embedding.weight"].shape == (1001, 64) and weights["head"].shape == (1001, 64)
    assert {n.split(".")[1] for n in weights if n.startswith("layers.")} == {"0", "1"}
    # TP1 x PP1 x DP1, distributed optimizer off.
    single = Trainer(tiny_config(str(tmp_path / "b"), *common, *load)).train()
    assert [r["step"] for r in single] == [3, 4]
    assert [r["loss"] for r in single] == pytest.approx(losses[2:], rel=1e-5)
    assert [r["grad_norm"] for r in single] == pytest.approx(norms[2:], rel=1e-4)
    # TP4 x PP1 x DP2 (kv heads now replicated over TP), distributed optimizer on, with other
    # buckets: every DP shard boundary falls somewhere else inside the parameters.
    tp4 = [*common, *load, "parallel.tp=4", "parallel.distributed_optimizer=true", "parallel.bucket_size_mb=0.02"]
    for loss, norm in run_distributed(_layout_worker, 8, str(tmp_path / "c"), tp4):
        assert loss == pytest.approx(losses[2:], rel=1e-5)
        assert norm == pytest.approx(norms[2:], rel=1e-4)


class _SignalledTrainer(Trainer):
    """Rank 1 alone gets SIGUSR1 during step 2, as Slurm may signal only some ranks."""

    def train_step(self, batches):
        out = super().train_step(batches)
        if self.state.step == 1 and self.ps.rank == 1:  # `step` counts completed steps
            os.kill(os.getpid(), signal.SIGUSR1)
        return out


def _exact_resume_worker(rank: int, world: int, run_dir: str):
    """Straight 4 steps vs preempted after 2 (async checkpoint, clean exit) + resumed for 2, in the
    same processes."""
    par = ["parallel.distributed_optimizer=true", "parallel.bucket_size_mb=0.03", "train.train_steps=4",
           "checkpoint.async_save=true", "model.hidden_dropout=0.1"]  # dropout: the RNG state matters
    straight = Trainer(tiny_config(f"{run_dir}/a/r{rank}", *par)).train()
    ck = f"checkpoint.dir={run_dir}/b"
    first = _SignalledTrainer(tiny_config(f"{run_dir}/b/r{rank}", *par, ck)).train()
    resumed = Trainer(tiny_config(f"{run_dir}/b/r{rank}", *par, ck, "checkpoint.load=auto")).train()
    return ([r["loss"] for r in straight], [r["loss"] for r in first + resumed],
            [r["step"] for r in first], [r["step"] for r in resumed])


@pytest.mark.slow
def test_preempted_run_resumes_exactly_with_dp2_zero1_and_async_save(tmp_path):
    for straight, stitched, first_steps, resumed_steps in run_distributed(_exact_resume_worker, 2, str(tmp_path)):
        assert first_steps == [1, 2] and resumed_steps == [3, 4]  # both ranks stopped after step 2
        assert stitched == straight  # bit-identical on CPU
