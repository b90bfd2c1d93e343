"""The demo's stages: the commands each runs, at the full or the smoke size, and their numbers.

Every command is one a user could paste (the runner shows it as `megalite ...`); the configs are
examples/configs/demo/*.yaml and the size only adds `key=value` overrides (steps, how much of the
stdlib is read), so the smoke run in CI exercises the very same pipeline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megalite.pipeline.runner import Stage, cli_stage_available

CONFIGS = Path("examples") / "configs" / "demo"  # relative to ROOT, where the commands run: a moved checkout keeps its keys

# Steps and data per size. full: <= 15 min on 2 CPU cores; smoke: <= 3 min (CI).
SIZES: dict[str, dict] = {
    "full": {"max_files": 0, "vocab": 2048, "pretrain_steps": 400, "pretrain_eval": 25, "sft_steps": 150,
             "sft_eval": 15, "rm_steps": 80, "dpo_steps": 80, "pref_eval": 10, "grpo_steps": 30,
             "gen_tokens": 128, "heldout": 6, "train": []},
    "smoke": {"max_files": 30, "vocab": 600, "pretrain_steps": 40, "pretrain_eval": 10, "sft_steps": 30,
              "sft_eval": 10, "rm_steps": 20, "dpo_steps": 20, "pref_eval": 5, "grpo_steps": 6,
              "gen_tokens": 48, "heldout": 3,
              "train": ["train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_steps=1"]},
}


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _log(d: Path) -> str:
    return (d / "log.txt").read_text(errors="replace")


def _first_last(rows: list[dict], key: str) -> tuple[dict, dict] | None:
    have = [r for r in rows if r.get(key) is not None]
    return (have[0], have[-1]) if have else None


def _trend(rows: list[dict], key: str, name: str | None = None) -> dict:
    """{key_first, key_last, key_first_step, key_last_step} for the rows that carry `key`."""
    fl = _first_last(rows, key)
    name = name or key
    if not fl:
        return {}
    a, b = fl
    return {f"{name}_first": a[key], f"{name}_last": b[key], f"{name}_first_step": a["step"],
            f"{name}_last_step": b["step"]}


def _arrow(m: dict, name: str, label: str, fmt: str = ".3f") -> str:
    if f"{name}_first" not in m:
        return f"{label}: n/a"
    return (f"{label} {m[f'{name}_first']:{fmt}} (step {m[f'{name}_first_step']}) -> "
            f"{m[f'{name}_last']:{fmt}} (step {m[f'{name}_last_step']})")


def _train_summary(keys: list[tuple[str, str]]):
    def summarize(d: Path) -> dict:
        rows = read_metrics(d)
        m: dict = {"steps": rows[-1]["step"] if rows else 0}
        for key, name in keys:  # key: "a|b" takes the first of those names the stage logs
            found = next((k for k in key.split("|") if any(r.get(k) is not None for r in rows)), key)
            m.update(_trend(rows, found, name))
        return m
    return summarize


def _mean_of_halves(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 2:
        return {}
    h = max(1, len(vals) // 3)
    return {f"{key}_early": sum(vals[:h]) / h, f"{key}_late": sum(vals[-h:]) / h}


def build(out: Path, size: str) -> list[Stage]:
    z = SIZES[size]
    cfg = {n: str(CONFIGS / f"{n}.yaml") for n in ("clean", "pretrain", "sft", "rm", "dpo", "grpo", "generate")}
    raw, clean, stats = out / "collect" / "raw.jsonl", out / "clean" / "clean.jsonl", out / "clean" / "stats.json"
    tok = out / "tokenizer" / "tok.model"
    shards, pairs = out / "shards", out / "shards" / "pairs"
    files = ["--max-files", str(z["max_files"])] if z["max_files"] else []
    tok_args = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tok)]
    data_args = [f"data.tokenizer_model={tok}"]

    def train_args(name: str, steps: int, ev: int) -> list[str]:
        d = out / name
        return [f"train.run_dir={d}", f"train.train_steps={steps}", f"train.eval_interval={ev}",
                *z["train"], f"data.cache_dir={d / 'cache'}", *data_args]

    ckpt = {n: out / n / "checkpoints" for n in ("pretrain", "sft", "rm", "dpo", "grpo")}
    stages = [
        Stage("collect", "the stdlib's sources, docstrings and pydoc topics as JSONL",
              [["python", "-m", "megalite.pipeline.collect", "corpus", "--output", str(raw), *files]],
              summarize=_collect_summary, line=lambda m: (
                  f"{m['documents']:,} documents ({m.get('stdlib', 0)} modules, {m.get('docstring', 0)} docstrings, "
                  f"{m.get('pydoc', 0)} pydoc topics), {m['mb']} MB")),
        Stage("clean", "dedup, length filter, e-mail scrub (tools/clean_data.py)",
              [["python", "tools/clean_data.py", "--input", str(raw), "--output", str(clean), "--stats", str(stats),
                "--config", cfg["clean"], "--workers", "2"]],
              deps=("collect",), configs=(cfg["clean"],), summarize=_clean_summary, line=lambda m: (
                  f"kept {m['kept_docs']:,}/{m['input_docs']:,} docs (dropped: "
                  f"{', '.join(f'{v} {k}' for k, v in m['dropped'].items()) or 'none'}); "
                  f"{m['emails_scrubbed']} e-mail addresses scrubbed")),
        Stage("tokenizer", f"SentencePiece BPE, vocab {z['vocab']}, chat tokens reserved (tools/train_tokenizer.py)",
              [["python", "tools/train_tokenizer.py", "--input", str(clean), "--vocab-size", str(z["vocab"]),
                "--output", str(tok), "--threads", "2"]],
              deps=("clean",), summarize=lambda d: _tokenizer_summary(tok, clean), line=lambda m: (
                  f"vocab {m['vocab']}, {m['chars_per_token']:.2f} characters/token on the corpus, "
                  f"{m['chat_tokens']} chat tokens reserved")),
        Stage("shards", "token shards: pretraining text, SFT chats, preference pairs",
              [["python", "tools/preprocess_data.py", "--input", str(clean), "--output-prefix", str(shards / "stdlib"),
                *tok_args, "--append-eod", "--workers", "2"],
               ["python", "-m", "megalite.pipeline.collect", "pairs", "--output-dir", str(pairs), *files,
                "--heldout", str(z["heldout"])],
               ["python", "tools/preprocess_data.py", "--mode", "chat", "--input", str(pairs / "sft.jsonl"),
                "--output-prefix", str(shards / "sft"), *tok_args, "--workers", "1"],
               ["python", "tools/preprocess_data.py", "--mode", "preference", "--input",
                str(pairs / "preference.jsonl"), "--output-prefix", str(shards / "pref"), *tok_args, "--workers", "1"]],
              deps=("tokenizer",), summarize=_shards_summary, line=lambda m: (
                  f"{m['text_tokens']:,} pretraining tokens; {m['sft_pairs']:,} docstring->function pairs, "
                  f"{m['preference_pairs']:,} preference pairs, {m['heldout_prompts']} held-out prompts")),
        Stage("pretrain", "pretrain a small Llama (megalite pretrain)",
              [["python", "-m", "megalite.cli", "pretrain", "--config", cfg["pretrain"],
                f"data.path={shards / 'stdlib_text_document'}",
                *train_args("pretrain", z["pretrain_steps"], z["pretrain_eval"])]],
              deps=("shards",), configs=(cfg["pretrain"],),
              summarize=_train_summary([("loss", "loss"), ("eval_ppl", "eval_ppl")]),
              line=lambda m: _arrow(m, "eval_ppl", "held-out perplexity", ".1f") + "; " + _arrow(m, "loss", "loss")),
        Stage("sft", "SFT on docstring -> function pairs (megalite sft)",
              [["python", "-m", "megalite.cli", "sft", "--config", cfg["sft"], f"data.path={shards / 'sft'}",
                f"checkpoint.pretrained={ckpt['pretrain']}", *train_args("sft", z["sft_steps"], z["sft_eval"])]],
              deps=("pretrain",), configs=(cfg["sft"],),
              summarize=_train_summary([("loss", "loss"), ("eval_loss", "eval_loss")]),
              line=lambda m: _arrow(m, "eval_loss", "held-out SFT loss") + "; " + _arrow(m, "loss", "train loss")),
        Stage("rm", "reward model: function vs. its corrupted copy (megalite rm)",
              [["python", "-m", "megalite.cli", "rm", "--config", cfg["rm"], f"data.path={shards / 'pref'}",
                f"checkpoint.pretrained={ckpt['sft']}", *train_args("rm", z["rm_steps"], z["pref_eval"])]],
              deps=("sft",), configs=(cfg["rm"],), requires=("rm",),
              summarize=_train_summary([("loss", "loss"), ("eval_loss", "eval_loss"),
                                        ("eval_reward_accuracy|eval_accuracy", "eval_accuracy")]),
              line=lambda m: _arrow(m, "eval_accuracy", "held-out reward accuracy") + "; "
              + _arrow(m, "eval_loss", "held-out BT loss")),
        Stage("dpo", "DPO on the same pairs (megalite dpo)",
              [["python", "-m", "megalite.cli", "dpo", "--config", cfg["dpo"], f"data.path={shards / 'pref'}",
                f"checkpoint.pretrained={ckpt['sft']}", *train_args("dpo", z["dpo_steps"], z["pref_eval"])]],
              deps=("sft",), configs=(cfg["dpo"],), requires=("dpo",),
              summarize=_train_summary([("loss", "loss"), ("eval_loss", "eval_loss"),
                                        ("eval_reward_accuracy|eval_accuracy", "eval_accuracy"),
                                        ("eval_margin", "eval_margin")]),
              line=lambda m: _arrow(m, "eval_accuracy", "held-out reward accuracy") + "; "
              + _arrow(m, "eval_margin", "margin") + "; " + _arrow(m, "eval_loss", "DPO loss")),
    ]
    init = "dpo" if cli_stage_available("dpo") else "sft"  # GRPO refines the best model there is
    stages.append(
        Stage("grpo", f"GRPO from the {init.upper()} model, reward: the answer parses and is not trivial",
              [["python", "-m", "megalite.cli", "grpo", "--config", cfg["grpo"], f"rl.prompts={pairs / 'prompts.jsonl'}",
                f"checkpoint.pretrained={ckpt[init]}", "reward.function=megalite.pipeline.rewards:parses",
                *train_args("grpo", z["grpo_steps"], 0)]],
              deps=(init,), configs=(cfg["grpo"],), requires=("grpo",), summarize=_grpo_summary,
              line=lambda m: (f"mean reward {m['mean_reward_early']:.2f} (first third) -> {m['mean_reward_late']:.2f} "
                              f"(last third)" if "mean_reward_early" in m else "mean reward: n/a")))
    finals = [n for n in ("grpo", "dpo") if cli_stage_available(n)]
    final = finals[0] if finals else "sft"
    gen = ["python", "-m", "megalite.cli", "generate", "--config", cfg["generate"], *data_args,
           f"generate.prompts={pairs / 'heldout.jsonl'}", f"generate.max_new_tokens={z['gen_tokens']}"]
    samples = out / "samples"
    stages.append(
        Stage("samples", "greedy completions of held-out docstrings: " + (
                  f"SFT vs {final.upper()} model" if final != "sft" else "SFT model (no later stage in this build)"),
              [[*gen, f"checkpoint.load={ckpt['sft']}", f"train.run_dir={samples}",
                f"generate.output={samples / 'sft.jsonl'}"]]
              + ([[*gen, f"checkpoint.load={ckpt[final]}", f"train.run_dir={samples}",
                   f"generate.output={samples / 'final.jsonl'}"]] if final != "sft" else []),
              deps=tuple(dict.fromkeys(("sft", final))), configs=(cfg["generate"],),
              summarize=lambda d: _samples_summary(d, pairs / "heldout.jsonl", final), line=lambda m: (
                  f"parse rate SFT {m['sft_parse_rate']:.0%}" + (f", {m['final']} {m['final_parse_rate']:.0%}"
                                                                   if "final_parse_rate" in m else "")
                  + f" on {m['prompts']} held-out prompts")))
    return stages


def _collect_summary(d: Path) -> dict:
    return json.loads(_log(d).strip().splitlines()[-1])


def _clean_summary(d: Path) -> dict:
    s = json.loads((d / "stats.json").read_text())
    return {"input_docs": s["input_docs"], "kept_docs": s["kept_docs"], "dropped": s["dropped"],
            "emails_scrubbed": s["pii_replaced"].get("email", 0)}


def _tokenizer_summary(tok: Path, corpus: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    texts = [json.loads(line)["text"] for _, line in zip(range(200), corpus.open(encoding="utf-8"))]
    n_tok = sum(len(sp.encode(t)) for t in texts)
    chat = sum(1 for m in ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
               if sp.piece_to_id(m) != sp.unk_id())
    return {"vocab": sp.get_piece_size(), "chars_per_token": sum(map(len, texts)) / max(n_tok, 1), "chat_tokens": chat}


def _shards_summary(d: Path) -> dict:
    log = _log(d)
    m = {"text_tokens": int(re.search(r"^docs: [\d,]+\s+tokens: ([\d,]+)", log, re.M).group(1).replace(",", ""))}
    for line in log.splitlines():
        if line.startswith("{") and "sft_pairs" in line:
            m.update(json.loads(line))
    return m


def _grpo_summary(d: Path) -> dict:
    rows = read_metrics(d)
    m: dict = {"steps": rows[-1]["step"] if rows else 0}
    m.update(_mean_of_halves(rows, "mean_reward"))
    m.update(_mean_of_halves(rows, "response_length"))
    m.update(_trend(rows, "loss", "loss"))
    return m


def _samples_summary(d: Path, heldout: Path, final: str) -> dict:
    from megalite.pipeline.rewards import score

    refs = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    m: dict = {"prompts": len(refs), "final": final}
    rows = []
    for name in ("sft", "final"):
        p = d / f"{name}.jsonl"
        if not p.is_file():
            continue
        outs = [json.loads(line)["completion"] for line in p.read_text().splitlines() if line.strip()]
        m[f"{name}_parse_rate"] = sum(map(score, outs)) / max(len(outs), 1)
        rows.append(outs)
    m["samples"] = [{"prompt": r["prompt"], "reference": r["reference"], **{k: v[i] for k, v in zip(("sft", "final"), rows)}}
                    for i, r in enumerate(refs)]
    return m
