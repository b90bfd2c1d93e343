"""Generation: the KV-cache path equals full recomputation, batches equal single prompts, sampling is
seeded, TP2 equals TP1 (real gloo ranks), greedy tokens equal transformers' generate on an imported
HF Llama, and `megalite generate` writes its JSONL (or stops with one line)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megalite
from megalite.checkpoint import dist as ckpt
from megalite.config import Config, ConfigError, ModelConfig, ParallelConfig, load_config
from megalite.generation.sampling import filter_logits
from megalite.model import LlamaModel
from megalite.model.kv_cache import KVCache
from megalite.parallel.state import ParallelState, build_parallel_state
from megalite.testing import run_distributed

# init_std 0.2: peaked logits, so greedy choices are not near-ties that rounding could flip.
BASE = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=128, max_seq_len=64, init_std=0.2)
VARIANTS = {"mha": {"num_kv_heads": None}, "gqa": {}, "mqa": {"num_kv_heads": 1},
            "qk_norm": {"qk_norm": True}, "tied": {"tie_embeddings": True}}
PROMPTS = [[5, 17, 230, 8, 99], [42], [7, 7, 150, 3, 64, 201, 12, 9, 33], [250, 1, 2]]


def _cfg(**kw) -> ModelConfig:
    return dataclasses.replace(BASE, **kw)


def _model(cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 3) -> LlamaModel:
    m = LlamaModel(cfg, ps or ParallelState())
    m.init_weights(seed)
    with torch.no_grad():  # norms start at 1; random ones make a skipped or misplaced norm show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    return m.eval()


def _same(a, b, atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.tokens == y.tokens, f"prompt {i}: {x.tokens} != {y.tokens}"
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


# -- the cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_equals_full_recomputation(variant):
    model = _model(_cfg(**VARIANTS[variant]))
    for prompts in (PROMPTS[:1], PROMPTS):  # one prompt: the reference is the plain training forward
        cached = megalite.generate(model, prompts, 12)
        full = megalite.generate(model, prompts, 12, use_cache=False)
        _same(cached, full)
        assert all(len(g.tokens) == 12 for g in cached)
    # The first token and its log-prob come straight from the prompt's logits.
    with torch.no_grad():
        logp = F.log_softmax(model.full_logits(torch.tensor([PROMPTS[0]]))[0, -1], -1)
    assert cached[0].tokens[0] == int(logp.argmax())
    assert cached[0].logprobs[0] == pytest.approx(float(logp.max()), abs=1e-5)


def test_cache_filled_in_chunks_equals_one_forward():
    model = _model(_cfg(num_kv_heads=1))
    ids = torch.tensor([PROMPTS[2] + PROMPTS[0]])  # 14 tokens
    chunks = ((0, 5), (5, 8), (8, 9), (9, 14))  # a prefill, a chunk after it (masked), one token, a chunk
    with torch.no_grad():
        full = model.full_logits(ids)
        cache = KVCache(model.layer_ids, torch.ones(1, 16, dtype=torch.bool))
        got = [model.full_logits(ids[:, a:b], position_ids=torch.arange(a, b)[None], kv_cache=cache)[:, -1]
               for a, b in chunks]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(got), full[0, [b - 1 for _, b in chunks]], atol=1e-5, rtol=0)


def test_every_step_is_the_argmax_of_a_plain_forward_on_the_sequence_so_far():
    model = _model(_cfg())
    prompt = PROMPTS[2]
    gen = megalite.generate(model, [prompt], 10)[0]
    seq = torch.tensor([prompt + gen.tokens])
    with torch.no_grad():
        logp = F.log_softmax(model.full_logits(seq)[0], -1)
    steps = range(len(prompt) - 1, seq.shape[1] - 1)
    assert [int(logp[t].argmax()) for t in steps] == gen.tokens
    torch.testing.assert_close(torch.tensor([float(logp[t].max()) for t in steps]), torch.tensor(gen.logprobs),
                               atol=1e-4, rtol=0)


def test_a_training_model_generates_without_dropout_and_keeps_its_mode():
    cfg = _cfg(hidden_dropout=0.5, attention_dropout=0.5)
    model = _model(cfg)
    expect = megalite.generate(model, PROMPTS, 8)
    model.train()
    _same(megalite.generate(model, PROMPTS, 8), expect, atol=0)
    assert model.training and all(m.training for m in model.modules())


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = _model(_cfg(qk_norm=True))
    batch = megalite.generate(model, PROMPTS, 15)
    _same(batch, [megalite.generate(model, [p], 15)[0] for p in PROMPTS])


def test_eos_stops_each_row_and_is_kept():
    model = _model(_cfg())
    free = megalite.generate(model, PROMPTS, 12)
    eos = free[0].tokens[3]
    stopped = megalite.generate(model, PROMPTS, 12, eos=eos)
    for f, s in zip(free, stopped):
        end = f.tokens.index(eos) + 1 if eos in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:end] and len(s.logprobs) == end
    assert len(stopped[0].tokens) <= 4
    # Several eos ids: each row stops at the first of any.
    two = megalite.generate(model, PROMPTS, 12, eos=[eos, free[1].tokens[1]])
    assert len(two[1].tokens) <= 2


# -- sampling --------------------------------------------------------------------------------------

def test_sampling_is_seeded_and_top_k1_is_greedy():
    model = _model(_cfg())
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = megalite.generate(model, PROMPTS, seed=1, **kw)
    _same(a, megalite.generate(model, PROMPTS, seed=1, **kw), atol=0)
    other = megalite.generate(model, PROMPTS, seed=2, **kw)
    assert [g.tokens for g in other] != [g.tokens for g in a]
    greedy = megalite.generate(model, PROMPTS, 20)
    assert [g.tokens for g in a] != [g.tokens for g in greedy]
    for sampled in (megalite.generate(model, PROMPTS, 20, temperature=0.7, top_k=1, seed=5),
                    megalite.generate(model, PROMPTS, 20, temperature=1.3, top_p=1e-6, seed=5)):
        assert [g.tokens for g in sampled] == [g.tokens for g in greedy]
    # A sampled token's log-prob is under logits / temperature, over the whole vocabulary.
    t = 0.7
    first = megalite.generate(model, PROMPTS[:1], 1, temperature=t, top_k=3, seed=9)[0]
    with torch.no_grad():
        logp = F.log_softmax(model.full_logits(torch.tensor(PROMPTS[:1]))[0, -1] / t, -1)
    assert first.logprobs[0] == pytest.approx(float(logp[first.tokens[0]]), abs=1e-5)


def test_filter_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 1.0)) == [1, 3]
    assert kept(filter_logits(logits, 0, 0.7)) == [1, 3]  # 0.5 + 0.3 reach 0.7
    assert kept(filter_logits(logits, 0, 0.85)) == [1, 2, 3]
    assert kept(filter_logits(logits, 0, 0.4)) == [1]  # the most likely token always stays
    assert kept(filter_logits(logits, 3, 0.99)) == [1, 2, 3]
    # Drawn frequencies follow the filtered, renormalized distribution.
    g = torch.Generator().manual_seed(0)
    probs = filter_logits(logits, 0, 0.7).softmax(-1).expand(20000, 4)
    freq = torch.bincount(torch.multinomial(probs, 1, generator=g).flatten(), minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015, rtol=0)


def test_bad_arguments_are_one_line_errors():
    model = _model(_cfg())
    for kw, msg in ((dict(temperature=-1.0), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be in"),
                    (dict(top_k=-2), "top_k must be >= 0"), (dict(max_new_tokens=60), "exceeds model.max_seq_len")):
        with pytest.raises(ConfigError, match=msg):
            megalite.generate(model, PROMPTS, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        megalite.generate(model, [[1], []], 4)
    with pytest.raises(ConfigError, match="token id 300 outside"):
        megalite.generate(model, [[1, 300]], 4)
    with pytest.raises(ConfigError, match="list of token-id lists"):
        megalite.generate(model, [1, 2, 3], 4)
    sp = LlamaModel(BASE, ParallelState(sp=True))
    with pytest.raises(ConfigError, match="sequence parallelism"):
        megalite.generate(sp, PROMPTS, 4)
    with pytest.raises(ConfigError, match="output_head=score"):
        megalite.generate(LlamaModel(_cfg(output_head="score"), ParallelState()), PROMPTS, 4)
    with pytest.raises(ConfigError, match="parallel.vpp > 1"):
        megalite.generate(LlamaModel(BASE, ParallelState(pp=2, vpp=2)), PROMPTS, 4)
    stage = LlamaModel(BASE, ParallelState(pp=2), layer_ids=[0], post_process=False)  # stage 0 of 2
    with pytest.raises(ConfigError, match="is not pipeline stage 1 of 2"):
        megalite.generate(LlamaModel(BASE, ParallelState(pp=2, pp_rank=1), layer_ids=[0], post_process=False),
                          PROMPTS, 4)
    assert stage.pre_process and not stage.post_process


# -- tensor parallelism ----------------------------------------------------------------------------

TP_VARIANTS = {"gqa_kv2": {}, "kv1_lt_tp": {"num_kv_heads": 1}, "qk_norm": {"qk_norm": True}}
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.9, seed=4)


def _tp_worker(rank: int, world: int, ckpt_dir: str) -> dict:
    ps = build_parallel_state(ParallelConfig(tp=world))
    out = {}
    for name, kw in TP_VARIANTS.items():
        model = _model(_cfg(**kw), ps)
        out[name] = (megalite.generate(model, PROMPTS, 10), megalite.generate(model, PROMPTS, 10, **SAMPLING))
        if name == "kv1_lt_tp":  # a TP2 checkpoint, for load_model at world size 1
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            ckpt.save_checkpoint(ckpt_dir, 1, [model], opt, ps, Config(model=_cfg(**kw)), {"consumed_samples": 0})
    return out


@pytest.mark.slow
def test_tp2_generates_what_tp1_does(tmp_path):
    results = run_distributed(_tp_worker, 2, str(tmp_path / "ck"))
    for name, kw in TP_VARIANTS.items():
        ref = _model(_cfg(**kw))
        greedy, sampled = megalite.generate(ref, PROMPTS, 10), megalite.generate(ref, PROMPTS, 10, **SAMPLING)
        for rank, res in enumerate(results):
            _same(res[name][0], greedy)
            _same(res[name][1], sampled)
            assert res[name][0] == results[0][name][0], f"{name}: TP rank {rank} differs"
    # load_model reshards the TP2 checkpoint (one kv head, replicated over TP) to world size 1.
    loaded = megalite.load_model(tmp_path / "ck", device="cpu")
    ref = _model(_cfg(**TP_VARIANTS["kv1_lt_tp"]))
    assert not loaded.training and loaded.ps.world_size == 1
    ids = torch.tensor(PROMPTS[2:3])
    with torch.no_grad():
        logits = loaded(ids)
        assert logits.shape == (1, len(PROMPTS[2]), loaded.vocab_padded)
        torch.testing.assert_close(logits[..., : BASE.vocab_size], ref.full_logits(ids), atol=1e-5, rtol=0)
    _same(megalite.generate(loaded, PROMPTS, 10), megalite.generate(ref, PROMPTS, 10))


PP_VARIANTS = {"gqa": {}, "tied": {"tie_embeddings": True}}


def _pp_worker(rank: int, world: int) -> dict:
    from megalite.parallel.pipeline import stage_specs

    par = ParallelConfig(pp=world)
    ps = build_parallel_state(par)
    out = {}
    for name, kw in PP_VARIANTS.items():
        cfg = _cfg(num_layers=3, **kw)
        (spec,) = stage_specs(cfg.num_layers, par, ps.pp_rank)
        model = LlamaModel(cfg, ps, layer_ids=spec.layer_ids, pre_process=spec.pre_process,
                           post_process=spec.post_process)
        model.init_weights(3)  # seeded by global parameter name: the same model as one process
        model.eval()
        out[name] = (megalite.generate(model, PROMPTS, 10), megalite.generate(model, PROMPTS, 10, **SAMPLING),
                     megalite.generate(model, PROMPTS, 6, use_cache=False))
    return out


@pytest.mark.slow
def test_pp2_generates_what_one_process_does():
    results = run_distributed(_pp_worker, 2)
    for name, kw in PP_VARIANTS.items():
        ref = LlamaModel(_cfg(num_layers=3, **kw), ParallelState())
        ref.init_weights(3)
        ref.eval()
        expect = (megalite.generate(ref, PROMPTS, 10), megalite.generate(ref, PROMPTS, 10, **SAMPLING),
                  megalite.generate(ref, PROMPTS, 6, use_cache=False))
        for res in results:  # every stage returns the tokens and log-probs
            for got, want in zip(res[name], expect):
                _same(got, want)


# -- transformers ----------------------------------------------------------------------------------

def test_greedy_tokens_equal_transformers_generate(tmp_path, monkeypatch, capsys):
    import transformers

    from tests.tools.test_convert_checkpoint import convert

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500000.0, rope_scaling=rope, initializer_range=0.2,
                                      rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert(monkeypatch, capsys, "--from", "hf", "--to", "megalite", "--input", tmp_path / "hf",
                   "--output", tmp_path / "ml")[0] == 0
    model = megalite.load_model(tmp_path / "ml", device="cpu")
    ours = megalite.generate(model, PROMPTS, 16, eos=2)
    for prompt, gen in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        theirs = out.sequences[0, len(prompt):].tolist()
        assert gen.tokens == theirs
        hf_logps = [float(F.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, theirs)]
        torch.testing.assert_close(torch.tensor(gen.logprobs), torch.tensor(hf_logps), atol=1e-4, rtol=0)


# -- the CLI ---------------------------------------------------------------------------------------

BYTE = BASE  # larger than the byte tokenizer's vocabulary (as a padded model's may be)


def _checkpoint(path: Path) -> LlamaModel:
    model = _model(BYTE)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ckpt.save_checkpoint(path, 2, [model], opt, ParallelState(), Config(model=BYTE), {"consumed_samples": 0})
    return model


def _cli(*args: str) -> int:
    from megalite.cli import main

    return main(["generate", *map(str, args)])


def test_cli_writes_completions(tmp_path, capsys):
    model = _checkpoint(tmp_path / "ck")
    (tmp_path / "p.txt").write_text("hello there\n\nab\n" + "x" * 20 + "\n")
    code = _cli("checkpoint.load=" + str(tmp_path / "ck"), f"generate.prompts={tmp_path / 'p.txt'}",
                f"train.run_dir={tmp_path / 'run'}", "generate.max_new_tokens=9", "generate.batch_size=2")
    assert code == 0, capsys.readouterr().err
    lines = (tmp_path / "run/generations.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["prompt"] for r in recs] == ["hello there", "ab", "x" * 20]
    expect = megalite.generate(model, [list(r["prompt"].encode()) for r in recs], 9, eos=257)
    for r, g in zip(recs, expect):
        assert r["tokens"] == g.tokens and r["completion"] == bytes(t for t in g.tokens if t < 256).decode(
            "utf-8", errors="replace")
        torch.testing.assert_close(torch.tensor(r["logprobs"]), torch.tensor(g.logprobs), atol=1e-5, rtol=0)
    # JSONL prompts, an explicit output path, sampling.
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hello there"}) + "\n")
    out = tmp_path / "o" / "gen.jsonl"
    assert _cli("checkpoint.load=" + str(tmp_path / "ck"), f"generate.prompts={tmp_path / 'p.jsonl'}",
                f"generate.output={out}", "generate.max_new_tokens=9", "generate.temperature=0.8") == 0
    rec = json.loads(out.read_text())
    assert rec["prompt"] == "hello there" and len(rec["tokens"]) == 9 and rec["tokens"] != recs[0]["tokens"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    _checkpoint(tmp_path / "ck")
    ck = "checkpoint.load=" + str(tmp_path / "ck")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "p.txt").write_text("hello\n")
    cases = [
        ((ck, f"generate.prompts={tmp_path / 'missing.txt'}"), "generate.prompts: file not found"),
        ((ck,), "generate.prompts is required"),
        (("checkpoint.load=" + str(tmp_path / "none"), f"generate.prompts={tmp_path / 'p.txt'}"),
         "no checkpoint found at"),
        ((ck, f"generate.prompts={tmp_path / 'bad.jsonl'}"), "bad.jsonl:2: expected an object with"),
        ((ck, f"generate.prompts={tmp_path / 'p.txt'}", "parallel.vpp=2"), "parallel.vpp > 1"),
        ((ck, f"generate.prompts={tmp_path / 'p.txt'}", "parallel.tp=3"), "world size 1 is not divisible by tp*pp*cp"),
        ((ck, f"generate.prompts={tmp_path / 'p.txt'}", "generate.max_new_tokens=100"), "p.txt:1: the prompt"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        code = _cli(*args, f"train.run_dir={tmp_path / 'run'}")
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, (args, err)
    assert not (tmp_path / "run").exists()


def _cli_worker(rank: int, world: int, ck: str, prompts: str, run: str, layouts: list[list[str]]) -> list:
    from megalite.generation.cli import run_generate

    out = []
    for layout in layouts:
        cfg = load_config(None, [f"checkpoint.load={ck}", f"generate.prompts={prompts}", f"train.run_dir={run}",
                                 "generate.max_new_tokens=6", "generate.batch_size=1", "generate.temperature=0.9",
                                 *layout])
        out.append(run_generate(cfg))
    return out


@pytest.mark.slow
def test_cli_under_tp2_and_dp2_writes_what_one_process_does(tmp_path):
    _checkpoint(tmp_path / "ck")
    (tmp_path / "p.txt").write_text("hello\nab\nxyz\n")
    args = (str(tmp_path / "ck"), str(tmp_path / "p.txt"))
    single = _cli_worker(0, 1, *args, str(tmp_path / "one"), [[]])[0]
    # TP2, two DP replicas splitting the batches, then two pipeline stages.
    ranks = run_distributed(_cli_worker, 2, *args, str(tmp_path / "two"), [["parallel.tp=2"], [], ["parallel.pp=2"]])
    assert ranks[1] == [None, None, None]  # rank 0 writes
    for records in ranks[0]:
        assert [r["tokens"] for r in records] == [r["tokens"] for r in single]
        for r, s in zip(records, single):
            torch.testing.assert_close(torch.tensor(r["logprobs"]), torch.tensor(s["logprobs"]), atol=1e-4, rtol=0)
    written = [json.loads(x) for x in (tmp_path / "two/generations.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in written] == [r["tokens"] for r in single]


def test_cli_chat_prompts_use_the_sft_chat_template(tmp_path, capsys):
    chat = pytest.importorskip("megalite.data.chat", reason="megalite/data/chat.py (SFT data) not merged yet")
    from megalite.data.tokenizer import ByteTokenizer

    model = _checkpoint(tmp_path / "ck")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "p.txt").write_text("hi\n")
    out = tmp_path / "out.jsonl"
    for prompts, extra in (("chat.jsonl", []), ("p.txt", ["generate.chat=true"])):
        assert _cli("checkpoint.load=" + str(tmp_path / "ck"), f"generate.prompts={tmp_path / prompts}",
                    f"generate.output={out}", "generate.max_new_tokens=8", *extra) == 0, capsys.readouterr().err
        tok = ByteTokenizer()
        conv = messages if prompts == "chat.jsonl" else messages[1:]
        ids = chat.encode_prompt(chat.load_chat_template("auto", tok), tok, conv)
        assert ids[-1] != tok.encode("hi")[-1]  # ends with the assistant header, not the user's text
        stop = sorted({tok.eos, *(tok.chat_tokens[t] for t in ("<|im_end|>", "<|eot_id|>") if t in tok.chat_tokens)})
        expect = megalite.generate(model, [ids], 8, eos=stop)[0]
        assert json.loads(out.read_text())["tokens"] == expect.tokens
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert _cli("checkpoint.load=" + str(tmp_path / "ck"), f"generate.prompts={tmp_path / 'bad.jsonl'}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bad.jsonl:1" in err, err
