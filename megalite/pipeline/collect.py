"""Stage 1 and the post-training data: the stdlib as JSONL, and what the later stages train on.

    python -m megalite.pipeline.collect corpus --output raw.jsonl [--max-files N]
    python -m megalite.pipeline.collect pairs --output-dir DIR [--max-files N] [--heldout N]

`corpus`: each module's source, its docstrings (module, classes, functions) as documents of their
own, and the pydoc topics. `pairs`: docstring -> function pairs mined with `ast` (SFT, chat records),
preference pairs whose rejected answer is the function corrupted until it no longer parses (RM and
DPO), prompts for GRPO, and held-out prompts for sampling (from modules no other file saw).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import random
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from megalite.atomic import atomic_write_text


def stdlib_files(max_files: int | None) -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return files[:max_files] if max_files else files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" files", mininterval=0.5, file=sys.stderr)


def corpus_records(files: list[Path]) -> Iterator[dict]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for key in sorted(topics):
        yield {"text": topics[key], "source": f"pydoc:{key}"}
    with _bar(len(files), "collect") as bar:
        for path in files:
            text = _read(path)
            bar.update(1)
            if not text or not text.strip():
                continue
            yield {"text": text, "source": f"stdlib:{path.name}"}
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            for node in [tree, *ast.walk(tree)]:
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 80:  # one-liners are mostly noise as documents
                        name = getattr(node, "name", "<module>")
                        yield {"text": doc, "source": f"docstring:{path.name}:{name}"}


# -- docstring -> function pairs -------------------------------------------------------------------
def _functions(path: Path, max_chars: int) -> Iterator[tuple[str, str]]:
    """(prompt, answer) per top-level or method function with a docstring: the prompt is the
    docstring and the signature, the answer the function without its docstring (ast.unparse gives
    every answer the same layout)."""
    text = _read(path)
    if not text:
        return
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20 or len(node.body) < 2:
            continue
        fn = copy.copy(node)  # shallow: the tree's own node keeps its docstring for other walks
        fn.body = node.body[1:]
        fn.decorator_list = []
        try:
            answer = ast.unparse(fn)
            sig = answer.splitlines()[0]
        except Exception:  # noqa: BLE001 - ast.unparse of odd nodes: skip the function
            continue
        if len(answer) > max_chars or len(answer.splitlines()) < 3:
            continue
        doc = textwrap.shorten(doc, 200, placeholder=" ...")
        yield f"{doc}\n\n{sig}", answer


def corrupt(answer: str, rng: random.Random) -> str | None:
    """The function damaged until `ast.parse` refuses it: lines shuffled, cut off or deleted, or
    the indentation flattened. None if no try broke it."""
    lines = answer.splitlines()
    for _ in range(20):
        kind = rng.choice(["shuffle", "truncate", "delete", "dedent"])
        out = list(lines)
        if kind == "shuffle":
            body = out[1:]
            rng.shuffle(body)
            out = [out[0], *body]
        elif kind == "truncate":
            out = out[: rng.randint(1, max(1, len(out) - 1))]
            out[-1] = out[-1][: max(1, len(out[-1]) // 2)]
        elif kind == "delete":
            for _ in range(max(1, len(out) // 3)):
                if len(out) > 1:
                    del out[rng.randrange(1, len(out))]
        else:
            out = [out[0], *(ln.strip() for ln in out[1:])]
        text = "\n".join(out)
        try:
            ast.parse(text)
        except SyntaxError:
            return text
    return None


def _held_out(name: str, frac: float) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def write_pairs(out_dir: Path, files: list[Path], max_chars: int, heldout: int, seed: int, short: int = 300) -> dict:
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    with _bar(len(files), "mine") as bar:
        for path in files:
            dest = held if _held_out(path.name, 0.1) else train
            dest.extend(_functions(path, max_chars))
            bar.update(1)
    rng.shuffle(train)
    held = [(p, a) for p, a in held if len(a) <= short]  # held-out and GRPO answers fit in a short generation
    rng.shuffle(held)
    if not held:  # a small --max-files may hash no module into the held-out tenth
        held, train = train[-heldout:], train[:-heldout]
    held = held[:max(heldout, 1)]
    sft = [{"prompt": p, "completion": a} for p, a in train]
    prefs = []
    for p, a in train:
        bad = corrupt(a, rng)
        if bad is not None:
            prefs.append({"prompt": p, "chosen": a, "rejected": bad})
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        atomic_write_text(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    dump("sft.jsonl", sft)
    dump("preference.jsonl", prefs)
    # GRPO: short SFT prompts whose function fits in a short answer (rl.max_new_tokens)
    dump("prompts.jsonl", [{"prompt": p} for p, a in train if len(p) <= 250 and len(a) <= short])
    dump("heldout.jsonl", [{"prompt": p, "reference": a} for p, a in held])
    return {"sft_pairs": len(sft), "preference_pairs": len(prefs), "heldout_prompts": len(held)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["corpus", "pairs"])
    p.add_argument("--output", help="corpus: the JSONL to write")
    p.add_argument("--output-dir", help="pairs: the directory to write")
    p.add_argument("--max-files", type=int, default=None, help="read only the first N stdlib modules")
    p.add_argument("--max-chars", type=int, default=400, help="pairs: the longest function kept (a small model "
                   "writes short ones best)")
    p.add_argument("--heldout", type=int, default=6, help="pairs: held-out prompts to sample")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = stdlib_files(args.max_files)
    if args.what == "corpus":
        if not args.output:
            p.error("corpus needs --output")
        rows = list(corpus_records(files))
        atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        kinds: dict[str, int] = {}
        for r in rows:
            k = r["source"].split(":")[0]
            kinds[k] = kinds.get(k, 0) + 1
        print(json.dumps({"documents": len(rows), **kinds, "mb": round(sum(len(r["text"]) for r in rows) / 1e6, 2)}))
    else:
        if not args.output_dir:
            p.error("pairs needs --output-dir")
        print(json.dumps(write_pairs(Path(args.output_dir), files, args.max_chars, args.heldout, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
