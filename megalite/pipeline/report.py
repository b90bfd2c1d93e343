"""runs/demo/REPORT.md: a table of each stage's numbers, the plots, and samples side by side."""

from __future__ import annotations

import html
import time
from pathlib import Path

from megalite.atomic import atomic_write_text
from megalite.pipeline.runner import Result
from megalite.pipeline.stages import read_metrics

TRAINING = ("pretrain", "sft", "rm", "dpo", "grpo")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    have = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in have], [r[key] for r in have]


def plot(out: Path) -> list[tuple[str, str]]:
    """The PNGs under out/plots as (title, relative path); [] where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    runs = {n: read_metrics(out / n) for n in TRAINING}
    runs = {n: r for n, r in runs.items() if r}
    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(d / name, dpi=90)
        plt.close(fig)
        made.append((title, f"plots/{name}"))

    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False)
        for ax, (name, rows) in zip(axes[0], runs.items()):
            ax.plot(*_series(rows, "loss"), label="train")
            if _series(rows, "eval_loss")[0]:
                ax.plot(*_series(rows, "eval_loss"), "o-", label="held-out")
            ax.set_title(f"{name} loss")
            ax.set_xlabel("step")
            ax.legend()
        save(fig, "loss.png", "Loss curves of every training stage")
    ppl = {n: _series(runs[n], "eval_ppl") for n in ("pretrain", "sft") if n in runs}
    ppl = {n: s for n, s in ppl.items() if s[0]}
    if ppl:
        fig, axes = plt.subplots(1, len(ppl), figsize=(4.5 * len(ppl), 3.2), squeeze=False)
        for ax, (name, (x, y)) in zip(axes[0], ppl.items()):
            ax.plot(x, y, "o-")
            ax.set_yscale("log")
            ax.set_title(f"{name}: held-out perplexity")
            ax.set_xlabel("step")
        save(fig, "eval_ppl.png", "Held-out perplexity")
    for name in ("rm", "dpo"):
        if name not in runs:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for key, label in (("reward_accuracy", "train"), ("eval_reward_accuracy", "held-out")):
            a.plot(*_series(runs[name], key), label=label)
        a.set_title(f"{name}: reward accuracy")
        for key, label in (("margin", "train"), ("eval_margin", "held-out")):
            b.plot(*_series(runs[name], key), label=label)
        b.set_title(f"{name}: margin (chosen - rejected)")
        for ax in (a, b):
            ax.set_xlabel("step")
            ax.legend()
        save(fig, f"{name}.png", f"{name.upper()}: reward accuracy and margins")
    if "grpo" in runs:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        a.plot(*_series(runs["grpo"], "mean_reward"))
        a.set_title("GRPO: mean reward (parses, not trivial)")
        b.plot(*_series(runs["grpo"], "response_length"))
        b.set_title("GRPO: response length (tokens)")
        for ax in (a, b):
            ax.set_xlabel("step")
        save(fig, "grpo.png", "GRPO reward and response length")
    return made


def _dur(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


def write_report(out: Path, results: list[Result], size: str, total_wall: float) -> Path:
    plots = plot(out)
    done = [r for r in results if r.status in ("ran", "reused")]
    lines = [f"# megalite demo ({size})", "",
             f"Raw stdlib text to an aligned model, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"This run took {_dur(total_wall)}. The stages took {_dur(sum(r.wall_s for r in done))} wall and "
             f"{_dur(sum(r.cpu_s for r in done))} CPU (user + sys of their processes: the wall time one unloaded "
             "core would need) when they ran; `reused` ones ran in an earlier run with the same inputs.", "",
             "| # | stage | status | numbers | wall | cpu |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        timing = (_dur(r.wall_s), _dur(r.cpu_s)) if r.status in ("ran", "reused", "failed") else ("", "")
        lines.append(f"| {i} | {r.name}: {r.title} | {r.status} | {r.line} | {timing[0]} | {timing[1]} |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots:
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    else:
        lines += ["Plots need matplotlib: `pip install -e '.[demo]'` (make demo installs it).", ""]
    samples = next((r for r in results if r.name == "samples" and r.status in ("ran", "reused")), None)
    if samples and samples.metrics.get("samples"):
        final = samples.metrics.get("final", "sft")
        cols = ["sft"] + (["final"] if final != "sft" else [])
        which = (f"Before alignment (SFT) and after ({final.upper()})" if final != "sft" else
                 "The SFT model (no alignment stage in this build)")
        lines += ["## Samples: held-out docstrings, greedy", "",
                  f"{which}; the reference is the stdlib's own code, from modules no stage trained on. "
                  "✓ marks an answer that parses and is not trivial.", ""]
        from megalite.pipeline.rewards import score

        for s in samples.metrics["samples"]:
            lines += ["<table>", f"<tr><td colspan=\"{len(cols) + 1}\"><pre>{html.escape(s['prompt'])}</pre></td></tr>",
                      "<tr>" + "".join(f"<th>{c if c == 'sft' else final} {'✓' if score(s.get(c, '')) else '✗'}</th>"
                                       for c in cols) + "<th>reference</th></tr>",
                      "<tr>" + "".join(f"<td><pre>{html.escape(s.get(c, ''))}</pre></td>" for c in cols)
                      + f"<td><pre>{html.escape(s['reference'])}</pre></td></tr>", "</table>", ""]
    lines += ["## Commands", "", "```"]
    for r in results:
        lines += r.commands
    lines += ["```", ""]
    path = out / "REPORT.md"
    atomic_write_text(path, "\n".join(lines))
    return path
