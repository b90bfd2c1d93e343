"""Run pipeline stages as subprocesses, each keyed by its inputs and skipped when already done.

A stage's key hashes its commands, the contents of the config files it reads and the keys of the
stages it depends on, so a changed config or a redone upstream stage redoes it (and everything
after it), while a rerun with nothing changed reuses the finished outputs. A finished stage leaves
`<out>/<name>/stage.json` (key, numbers, times), written last and atomically: a stage killed half
way has none and runs again from a clean directory.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megalite.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
MARKER = "stage.json"


@dataclass
class Stage:
    name: str  # also its directory under the output root
    title: str
    commands: list[list[str]]  # argv lists, run in order; "python" is this interpreter
    deps: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()  # files whose contents are part of the key (relative to ROOT or absolute)
    requires: tuple[str, ...] = ()  # `megalite <stage>` commands this build must have
    summarize: Callable[[Path], dict] = field(default=lambda d: {})  # numbers read from the outputs
    line: Callable[[dict], str] = field(default=lambda m: "")  # the one-line summary of those numbers


@dataclass
class Result:
    name: str
    title: str
    status: str  # ran | reused | skipped | failed
    metrics: dict
    line: str
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the children's user + sys time: the wall time on an unloaded core
    key: str = ""
    commands: list[str] = field(default_factory=list)


def cli_stage_available(stage: str) -> bool:
    """Whether `megalite <stage>` exists in this build (the CLI's table names a module:function)."""
    from megalite.cli import STAGES

    module, fn = STAGES[stage].split(":")
    try:
        return callable(getattr(importlib.import_module(module), fn, None))
    except ImportError:
        return False


def _display(cmd: list[str]) -> str:
    if cmd[:3] == ["python", "-m", "megalite.cli"]:
        cmd = ["megalite", *cmd[3:]]
    return " ".join(shlex.quote(c) for c in cmd)


def _argv(cmd: list[str]) -> list[str]:
    return [sys.executable if c == "python" and i == 0 else c for i, c in enumerate(cmd)]


def stage_key(stage: Stage, dep_keys: list[str]) -> str:
    h = hashlib.sha256()
    configs = {c: hashlib.sha256((ROOT / c).read_bytes()).hexdigest() for c in stage.configs}
    h.update(json.dumps({"name": stage.name, "commands": stage.commands, "configs": configs,
                         "deps": dep_keys}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _stream(cmd: list[str], log, env: dict[str, str]) -> int:
    """Runs `cmd`, copying its output (progress bars included) to the console and the log."""
    proc = subprocess.Popen(_argv(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    assert proc.stdout is not None
    out = sys.stdout.buffer
    while chunk := os.read(proc.stdout.fileno(), 8192):
        out.write(chunk)
        out.flush()
        log.write(chunk)
    return proc.wait()


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stages(stages: list[Stage], out: Path, fresh: bool = False) -> list[Result]:
    """Runs (or reuses, or skips) each stage in order; stops at the first failure."""
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    results: list[Result] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for i, st in enumerate(stages, 1):
        d = out / st.name
        head = f"[{i}/{len(stages)}] {st.name}"
        print(f"\n=== {head}: {st.title}", flush=True)
        missing = [r for r in st.requires if not cli_stage_available(r)]
        dead = [dep for dep in st.deps if dep not in keys]
        if missing or dead:
            why = (f"stage not available in this build (megalite {', '.join(missing)})" if missing
                   else f"needs {', '.join(dead)}, which did not run")
            res = Result(st.name, st.title, "skipped", {}, f"skipped: {why}")
            print(f"{head}: {res.line}", flush=True)
            results.append(res)
            continue
        key = stage_key(st, [keys[dep] for dep in st.deps])
        marker = d / MARKER
        if not fresh and marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                keys[st.name] = key
                res = Result(**{**saved, "status": "reused"})
                print(f"{head}: reused (inputs unchanged, key {key}) | {res.line}", flush=True)
                results.append(res)
                continue
        shutil.rmtree(d, ignore_errors=True)  # a stale or half-done output: the trainer would resume it
        d.mkdir(parents=True)
        t0, c0 = time.time(), _cpu_children()
        shown = [_display(c) for c in st.commands]
        with open(d / "log.txt", "wb") as log:
            for cmd, text in zip(st.commands, shown):
                print(f"$ {text}", flush=True)
                log.write(f"$ {text}\n".encode())
                rc = _stream(cmd, log, env)
                if rc != 0:
                    res = Result(st.name, st.title, "failed", {}, f"failed: exit {rc} from `{text}` (log: {d / 'log.txt'})",
                                 time.time() - t0, _cpu_children() - c0, key, shown)
                    print(f"{head}: {res.line}", flush=True)
                    results.append(res)
                    return results
        metrics = st.summarize(d)
        res = Result(st.name, st.title, "ran", metrics, st.line(metrics), time.time() - t0, _cpu_children() - c0,
                     key, shown)
        atomic_write_text(marker, json.dumps(res.__dict__, indent=1))
        keys[st.name] = key
        print(f"{head}: done in {res.wall_s:.0f}s (cpu {res.cpu_s:.0f}s) | {res.line}", flush=True)
        results.append(res)
    return results
