"""The lm-evaluation-harness adapter on local tasks (YAML over JSONL, no network) gives the same
log-likelihoods as `megalite eval` for the same texts, and its generations are megalite.generate's."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

import megalite  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.evaluation.perplexity import run_eval  # noqa: E402
from tests.evaluation.common import MODEL, TEXTS, make_checkpoint, write_texts  # noqa: E402

MC = [{"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "print"], "answer": 0},
      {"question": "import", "choices": ["os", "sys", "xyz qq"], "answer": 1},
      {"question": "for i in", "choices": ["range(10):", "banana", "0"], "answer": 0}]

TASKS = """\
task: megalite_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
---
task: megalite_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {texts}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
---
task: megalite_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ck = make_checkpoint(root)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    texts = write_texts(root / "texts.jsonl")
    tasks = root / "tasks"
    tasks.mkdir()
    for i, part in enumerate(TASKS.format(mc=root / "mc.jsonl", texts=texts).split("---\n")):
        (tasks / f"task{i}.yaml").write_text(part)
    return root, ck, tasks


def _offline(monkeypatch, root):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf"))


def _megalite_eval(ck, path, run_dir):
    cfg = load_config(None, [*MODEL, f"checkpoint.load={ck}", f"train.run_dir={run_dir}", "train.seq_len=64",
                             "train.micro_batch_size=2", "train.global_batch_size=2", f"eval.jsonl={path}"])
    return [r["loglikelihood"] for r in run_eval(cfg)["texts"]]


def test_adapter_loglikelihoods_equal_megalite_eval(setup, monkeypatch, tmp_path):
    root, ck, tasks = setup
    _offline(monkeypatch, root)
    import lm_eval
    from lm_eval.tasks import TaskManager

    importlib.import_module("megalite.evaluation.lm_eval_adapter")  # registers --model megalite

    out = lm_eval.simple_evaluate(model="megalite", model_args=f"checkpoint={ck},batch_size=2",
                                  tasks=["megalite_mc", "megalite_rolling", "megalite_gen"],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    samples = out["samples"]
    # Multiple choice: log p(" choice" | question) = log p(question + " choice") - log p(question),
    # both scored by `megalite eval` (byte tokens: the join splits exactly there).
    texts = [d["question"] for d in MC] + [d["question"] + " " + c for d in MC for c in d["choices"]]
    ll = _megalite_eval(ck, write_texts(tmp_path / "mc_texts.jsonl", texts), tmp_path / "run")
    ctx, joined = ll[: len(MC)], iter(ll[len(MC):])
    by_doc = sorted(samples["megalite_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for i, s in enumerate(by_doc):
        want = [next(joined) - ctx[i] for _ in MC[i]["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), i
        correct += int(max(range(len(want)), key=want.__getitem__) == MC[i]["answer"])
    assert out["results"]["megalite_mc"]["acc,none"] == pytest.approx(correct / len(MC))
    # Rolling log-likelihood (perplexity tasks): the texts' log-likelihoods, windows included.
    want = _megalite_eval(ck, root / "texts.jsonl", tmp_path / "run2")
    by_doc = sorted(samples["megalite_rolling"], key=lambda s: s["doc_id"])
    assert [float(s["resps"][0][0]) for s in by_doc] == pytest.approx(want, rel=1e-5)
    assert len(want) == len(TEXTS)
    # generate_until: greedy megalite.generate after the same prompt, cut at the first newline.
    model = megalite.load_model(ck)
    for s in sorted(samples["megalite_gen"], key=lambda s: s["doc_id"]):
        prompt = [257, *MC[s["doc_id"]]["question"].encode()]
        gen = megalite.generate(model, [prompt], 6, eos=[257])[0].tokens
        text = bytes(t for t in gen if t < 256).decode("utf-8", "replace").split("\n")[0]
        assert s["resps"][0][0] == text


@pytest.mark.slow
def test_lm_eval_command_line(setup, monkeypatch, tmp_path):
    root, ck, tasks = setup
    _offline(monkeypatch, root)
    r = subprocess.run([sys.executable, "-m", "megalite.evaluation.lm_eval_main", "--model", "megalite",
                        "--model_args", f"checkpoint={ck}", "--tasks", "megalite_mc", "--include_path", str(tasks),
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(result.read_text())["results"]["megalite_mc"]
