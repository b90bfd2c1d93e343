"""GPT/blended/curriculum datasets: splits, determinism, caching, resumption, DP sharding."""

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from megalite.config import ConfigError, DataConfig
from megalite.data import build_pretrain_datasets, build_tokenizer
from megalite.data.datasets import GPTDataset, split_ranges
from megalite.data.indexed import IndexedDataset
from megalite.data.sampler import get_micro_batch
from tests.data.conftest import random_docs, write_shard

TOK = build_tokenizer("byte")


def _shard(tmp_path, name="web", n=400, seed=0, vocab=250):
    return write_shard(tmp_path / name, random_docs(np.random.default_rng(seed), n, vocab=vocab, max_len=120), vocab)


def test_gpt_dataset_windows_match_the_token_stream(tmp_path):
    prefix = _shard(tmp_path)
    shard = IndexedDataset(prefix)
    ds = GPTDataset(shard, (0, shard.num_documents), 32, seed=5)
    stream = np.concatenate([shard[int(d)] for d in ds.doc_index]).astype(np.int64)
    for i in range(0, len(ds), 17):
        j = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds[i], stream[j * 32 : j * 32 + 33])
    batch = ds.get_batch([0, 3, 3, len(ds) - 1])
    assert batch.shape == (4, 33) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch[1], ds[3])


def test_splits_are_disjoint_and_cover_documents():
    ranges = split_ranges(1000, "969,30,1")
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ConfigError, match="data.split"):
        split_ranges(10, "a,b")


def test_cached_index_is_reused_and_deterministic(tmp_path):
    prefix = _shard(tmp_path)
    cfg = DataConfig(path=prefix, cache_dir=str(tmp_path / "cache"), split="90,10,0")
    a = build_pretrain_datasets(cfg, 16, 7, TOK)
    entries = sorted(os.listdir(tmp_path / "cache" / "index"))
    assert len(entries) == 2 and a[2] is None  # train and valid; the empty test split is None
    b = build_pretrain_datasets(cfg, 16, 7, TOK)
    assert sorted(os.listdir(tmp_path / "cache" / "index")) == entries
    assert not b[0].sample_index.flags.owndata  # the second build maps the cache
    np.testing.assert_array_equal(a[0].get_batch(range(20)), b[0].get_batch(range(20)))
    c = build_pretrain_datasets(cfg, 16, 8, TOK)  # another seed: another key, another order
    assert len(os.listdir(tmp_path / "cache" / "index")) == 4
    assert not np.array_equal(a[0].get_batch(range(20)), c[0].get_batch(range(20)))


def test_resume_at_any_consumed_sample_matches_uninterrupted(tmp_path):
    cfg = DataConfig(path=_shard(tmp_path), cache_dir=str(tmp_path / "cache"))
    train = build_pretrain_datasets(cfg, 16, 1, TOK)[0]
    mbs, dp, micro = 2, 3, 2
    step = mbs * dp * micro

    def run(start_step, steps, ds):
        out = []
        for s in range(start_step, start_step + steps):
            out.append([get_micro_batch(ds, s * step, m, mbs, r, dp) for m in range(micro) for r in range(dp)])
        return out

    full = run(0, 8, train)
    again = build_pretrain_datasets(cfg, 16, 1, TOK)[0]  # a fresh process would map the same cache
    resumed = run(5, 3, again)
    for x, y in zip(full[5:], resumed):
        for a, b in zip(x, y):
            assert np.array_equal(a.numpy(), b.numpy())
    # DP ranks get disjoint samples of the same global batch.
    rows = [tuple(t.tolist()) for batch in full[0] for t in batch]
    assert len(set(rows)) == len(rows)


def test_blend_from_yaml_weights_and_num_samples(tmp_path):
    for i, name in enumerate(["web", "code", "books"]):
        _shard(tmp_path, name, n=300, seed=i)
    (tmp_path / "blend.yaml").write_text("blend:\n  web: 50%\n  code: 10%\n  books: 20%\n")
    cfg = DataConfig(path=str(tmp_path / "blend.yaml"), cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_pretrain_datasets(cfg, 16, 3, TOK, num_samples=4000)
    assert len(train) == 4000
    counts = np.bincount(train.which, minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.625, 0.125, 0.25], atol=1e-3)
    assert train.get_batch(np.arange(3990, 4000)).shape == (10, 17)  # components grew epochs as needed
    assert valid is not None


@pytest.mark.parametrize("curriculum", [False, True])
def test_blend_builds_each_component_index_once(tmp_path, monkeypatch, curriculum):
    """Blend sizes come from the shards' sizes; no throwaway one-epoch index is built first."""
    import megalite.data.datasets as dsm

    a, b = _shard(tmp_path, "a", seed=1), _shard(tmp_path, "b", seed=2)
    built = []
    orig = dsm.GPTDataset.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        orig(self, *args, **kwargs)

    monkeypatch.setattr(dsm.GPTDataset, "__init__", counting_init)
    extra = {"curriculum": [{"step": 0, "blend": {a: 1.0, b: 3.0}}]} if curriculum else {}
    cfg = DataConfig(path={a: 1.0, b: 3.0}, split="1,0,0", **extra)
    train = build_pretrain_datasets(cfg, 16, 3, TOK, num_samples=20000, global_batch_size=8)[0]
    assert len(built) == 2  # one per component, already with the epochs its share needs
    assert all(len(d) >= n for d, n in zip(train.datasets, np.bincount(train.which, minlength=2)))


def test_micro_batches_wrap_for_batched_and_plain_datasets(tmp_path):
    shard = IndexedDataset(_shard(tmp_path))
    ds = GPTDataset(shard, (0, shard.num_documents), 16, seed=1)
    plain = [ds[i] for i in range(len(ds))]  # no get_batch: rows are stacked one by one
    n = len(ds)
    for d in (ds, plain):
        got = get_micro_batch(d, n - 7, 1, 4, 1, 2)  # samples n+5 .. n+8: the second epoch's 5..8
        assert got.dtype == torch.int64 and got.shape == (4, 17)
        assert np.array_equal(got.numpy(), np.stack([ds[i] for i in range(5, 9)]))


def test_megatron_style_weighted_list(tmp_path):
    from megalite.data.datasets import parse_blend

    assert parse_blend("0.3 a 0.7 b") == [("a", 0.3), ("b", 0.7)]
    assert parse_blend(["0.3", "a", "70%", "b"]) == [("a", 0.3), ("b", 70.0)]
    assert parse_blend(["a", "b"]) == [("a", None), ("b", None)]


def test_curriculum_changes_weights_by_step(tmp_path):
    a, b = _shard(tmp_path, "a", seed=1), _shard(tmp_path, "b", seed=2)
    cfg = DataConfig(path={a: 1.0}, cache_dir=str(tmp_path / "cache"),
                     curriculum=[{"step": 0, "blend": {a: 1.0}}, {"step": 10, "blend": {a: 1, b: 3}}])
    train = build_pretrain_datasets(cfg, 16, 3, TOK, num_samples=400, global_batch_size=8)[0]
    assert set(train.which[:80].tolist()) == {0}
    late = np.bincount(train.which[80:], minlength=2)
    assert abs(late[1] / late.sum() - 0.75) < 0.01
    # Dataset a's cursor continues across stages: no sample of a repeats.
    a_ids = train.within[train.which == 0]
    assert np.array_equal(a_ids, np.arange(len(a_ids)))


def test_default_corpus_is_built_once_into_shards(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_pretrain_datasets(cfg, 64, 1, TOK)
    shards = list((tmp_path / "cache" / "corpus").glob("*/stdlib_text_document.idx"))
    assert len(shards) == 1 and len(train) > 1000 and valid is not None
    row = train[0]
    assert row.shape == (65,) and row.max() < TOK.vocab_size


def test_bad_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.idx: no such file"):
        build_pretrain_datasets(DataConfig(path=str(tmp_path / "nope")), 16, 1, TOK)
    (tmp_path / "b.yaml").write_text("web: lots\n")
    with pytest.raises(ConfigError, match="not a number"):
        build_pretrain_datasets(DataConfig(path=str(tmp_path / "b.yaml")), 16, 1, TOK)


def _build_in_child(prefix, cache, local_rank, q):
    os.environ["LOCAL_RANK"] = str(local_rank)
    import megalite.data.datasets as dsm

    calls = []
    orig = dsm.GPTDataset._build_to
    dsm.GPTDataset._build_to = lambda self, tmp: (calls.append(1), orig(self, tmp))[1]
    train = build_pretrain_datasets(DataConfig(path=prefix, cache_dir=cache, split="1,0,0"), 16, 1, TOK)[0]
    q.put((local_rank, len(calls), train.get_batch([0, 1, 2]).tolist()))


@pytest.mark.slow
def test_one_rank_builds_the_index_others_wait(tmp_path):
    prefix, cache = _shard(tmp_path, n=2000), str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(prefix, cache, r, q)) for r in (1, 2, 0)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == [1, 0, 0]  # only LOCAL_RANK 0 built
    assert results[0][2] == results[1][2] == results[2][2]


def test_unwritable_cache_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir"):
        build_pretrain_datasets(DataConfig(path=_shard(tmp_path), cache_dir=str(blocker / "sub")), 16, 1, TOK)


def _dp_rank_main(rank, world, prefix, cache):
    import torch

    train = build_pretrain_datasets(DataConfig(path=prefix, cache_dir=cache), 16, 1, TOK)[0]
    return torch.stack([get_micro_batch(train, 24, m, 2, rank, world) for m in range(3)])


@pytest.mark.slow
def test_dp_ranks_under_gloo_split_the_global_batch(tmp_path):
    from megalite.testing import run_distributed

    prefix, cache = _shard(tmp_path, n=600), str(tmp_path / "cache")
    got = run_distributed(_dp_rank_main, 2, prefix, cache)  # per rank: [micro, mbs, seq+1]
    splits = build_pretrain_datasets(DataConfig(path=prefix, cache_dir=cache), 16, 1, TOK)
    ref = splits[0]
    for r in range(2):
        for m in range(3):
            start = 24 + m * 2 * 2 + r * 2
            expect = ref.get_batch(range(start, start + 2))
            assert np.array_equal(got[r][m].numpy(), expect)
    entries = os.listdir(os.path.join(cache, "index"))  # one per split, no leftovers of the election
    assert len(entries) == sum(d is not None for d in splits)
    assert not [e for e in entries if e.endswith((".lock", ".tmp"))]
