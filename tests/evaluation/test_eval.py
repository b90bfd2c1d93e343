"""`megalite eval`: per-text log-likelihoods equal plain forwards of the loaded model; every layout
gives the single process's numbers."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

import megalite
from megalite.checkpoint.dist import resolve_checkpoint
from megalite.cli import main as cli_main
from megalite.config import load_config
from megalite.evaluation.perplexity import run_eval
from megalite.testing import run_distributed
from tests.evaluation.common import MODEL, TEXTS, make_checkpoint, reference_loglikelihood, write_texts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("evalck"))


def _cfg(ck, run_dir, *extra):
    return load_config(None, [*MODEL, f"checkpoint.load={ck}", f"train.run_dir={run_dir}", "train.seq_len=64",
                              "train.micro_batch_size=2", "train.global_batch_size=4", *extra])


def test_jsonl_loglikelihoods_equal_plain_forwards(ckpt, tmp_path):
    texts = write_texts(tmp_path / "t.jsonl")
    res = run_eval(_cfg(ckpt, tmp_path / "run", f"eval.jsonl={texts}"))
    model = megalite.load_model(ckpt)
    want = [reference_loglikelihood(model, t, 64) for t in TEXTS]
    got = [r["loglikelihood"] for r in res["texts"]]
    assert got == pytest.approx(want, rel=1e-5)
    assert [r["tokens"] for r in res["texts"]] == [len(t.encode()) for t in TEXTS]
    n = sum(len(t.encode()) for t in TEXTS)
    assert res["tokens"] == n and res["loss"] == pytest.approx(-sum(want) / n, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["bits_per_byte"] == pytest.approx(-sum(want) / math.log(2) / n, rel=1e-5)
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == res
    # A shorter window cuts the texts differently, and the numbers follow.
    short = run_eval(_cfg(ckpt, tmp_path / "run", f"eval.jsonl={texts}", "train.seq_len=16"))
    assert [r["loglikelihood"] for r in short["texts"]] == pytest.approx(
        [reference_loglikelihood(model, t, 16) for t in TEXTS], rel=1e-5)


def test_shards_and_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli_main(["eval", *MODEL, f"checkpoint.load={ckpt}", f"train.run_dir={tmp_path}", "train.seq_len=32",
                     "train.micro_batch_size=2", "train.global_batch_size=4", "eval.max_samples=6",
                     f"eval.output={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["windows"] == 6 and res["tokens"] == 6 * 32 and 1 < res["ppl"] < 259
    assert "megalite eval | " in capsys.readouterr().out
    assert cli_main(["eval", *MODEL, f"train.run_dir={tmp_path}", "checkpoint.load="]) == 2
    assert capsys.readouterr().err.strip() == "error: eval needs a checkpoint: set checkpoint.load=DIR"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert cli_main(["eval", *MODEL, f"checkpoint.load={ckpt}", "train.seq_len=32",
                     f"eval.jsonl={tmp_path / 'bad.jsonl'}"]) == 2
    assert capsys.readouterr().err.strip().endswith("bad.jsonl:2: no non-empty string under eval.text_key 'text'")


def _layout_worker(rank, world, ck, texts, run_dir, layouts):
    out = []
    for i, layout in enumerate(layouts):
        out.append((run_eval(_cfg(ck, f"{run_dir}/{i}", f"eval.jsonl={texts}", *layout)),
                    run_eval(_cfg(ck, f"{run_dir}/s{i}", "train.seq_len=32", "eval.max_samples=10", *layout))))
    return out


@pytest.mark.slow
def test_every_layout_gives_the_single_process_numbers(ckpt, tmp_path):
    texts = str(write_texts(tmp_path / "t.jsonl"))
    (single,) = _layout_worker(0, 1, str(ckpt), texts, str(tmp_path / "one"), [[]])
    layouts = [["parallel.tp=2"], ["parallel.tp=2", "parallel.sp=true"], ["parallel.pp=2"],
               ["parallel.pp=2", "parallel.vpp=2"], []]  # the last: two DP replicas
    ranks = run_distributed(_layout_worker, 2, str(ckpt), texts, str(tmp_path / "two"), layouts)
    assert all(r is None for pair in ranks[1] for r in pair)  # rank 0 reports
    for layout, (jsonl, shards) in zip(layouts, ranks[0]):
        got = [r["loglikelihood"] for r in jsonl["texts"]]
        assert got == pytest.approx([r["loglikelihood"] for r in single[0]["texts"]], rel=1e-5), layout
        assert shards["tokens"] == single[1]["tokens"] and shards["loss"] == pytest.approx(single[1]["loss"], rel=1e-5)


def test_checkpoint_config_that_does_not_match_its_weights_names_the_tensor(ckpt, tmp_path, capsys):
    step = resolve_checkpoint(ckpt)
    texts = write_texts(tmp_path / "t.jsonl")
    for name, edit, message in [
        ("shape", lambda m: m["config"]["model"].update(ffn_hidden_size=192),
         r"parameter 'layers\.0\.mlp\.gate_up\.weight' has global shape \[256, 64\] in the checkpoint, "
         r"the model expects \[384, 64\]"),
        ("missing", lambda m: m["params"].pop("layers.2.attn.out.weight"),
         r"parameter 'layers\.2\.attn\.out\.weight' is not in the checkpoint \(incompatible model\)"),
    ]:
        bad = tmp_path / name / step.name
        shutil.copytree(step, bad)
        meta = json.loads((bad / "meta.json").read_text())
        edit(meta)
        (bad / "meta.json").write_text(json.dumps(meta))
        assert cli_main(["eval", *MODEL, f"checkpoint.load={bad}", "train.seq_len=32", f"train.run_dir={tmp_path}",
                         f"eval.jsonl={texts}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(message, err), err
