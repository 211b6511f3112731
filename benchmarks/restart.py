"""Restart latency: process start -> first training step after resume, cold vs warm compilation cache.

    python benchmarks/restart.py                      # configs/small.py, 3 cold + 3 warm restarts (~9 min, busy box)
    python benchmarks/restart.py --reps 1             # quick
    python benchmarks/restart.py --config configs/tiny.py model.n_layers=4   # trailing args: config overrides

Set-up, untimed: tinyshakespeare is prepared with ``jaxckpt prepare`` (the default corpus if the text is
missing); ``jaxckpt train --stop-at-step K`` (train.steps = K + ``--steps``) writes the checkpoint at step K
that every restart resumes from; one more restart ("priming") fills the warm compilation cache.

Each restart is ``python -m jaxckpt.cli train`` (what the ``jaxckpt`` script runs) in a fresh subprocess,
on a fresh copy of the base workdir (so every restart resumes from the same step-K checkpoint), with the
base run's exact command except ``train.compilation_cache``: *cold* = a new empty directory, *warm* = the
primed one. It restores step K (its files are in the page cache: the copy was just written), trains
``--steps`` steps, saves and exits. Cold and warm alternate in
ABBA order (cold, warm, warm, cold, ...) so drift in the machine's load hits both alike; medians are
reported, and warm/cold is the ratio of the medians.

What is timed, from the restarted trainer's own ``events.jsonl`` (all wall clock, ``time.time()``):

* **latency** = ``start.process_start`` (the kernel's process creation time, to 10 ms) -> the
  ``first_step`` event (the first step after resume has finished: ``block_until_ready``).
* its parts: *startup* = process start -> ``start`` event (interpreter, imports, JAX backend, config);
  *build* = -> restore begins (``Run.build``: mesh, model, optimizer, data pipeline, jit wrappers;
  checkpoint manager); *restore* = the ``restore`` event's seconds (checksum verification + Orbax restore
  of state and data iterator); *prep* = -> first step dispatched (metrics writer, TensorBoard, first
  batch); *first step* = the ``first_step`` event's seconds: compiling the train step (cold: tracing,
  lowering, XLA compile, writing the cache entries) or taking ``jaxckpt.aot``'s stored executable (warm;
  its load starts on a thread before *build*, so only the part the build and restore did not hide shows
  here), then running it once.
* *later step* = median gap between the trainer's per-step metrics rows after the first step (the steady
  step time, ``train.log_every=1``; needs ``--steps`` >= 2); *latency − later step* estimates the restart
  without the one step's execution that no cache can remove, i.e. the part the compilation cache can act on.

Cross-checks from this (parent) process: *Popen -> first step* (parent's clock just before ``Popen`` to
the same ``first_step`` event: it includes the ``Popen`` call, and *process_start − Popen* shows the
two clocks agree) and *Popen -> exit* (the subprocess's whole wall time, including the remaining steps,
the final save and interpreter shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # run as a file (benchmarks/ is sys.path[0]), or imported as benchmarks.<name> from the repo root
    import benchlib
except ImportError:
    from benchmarks import benchlib
from jaxckpt.config import load_config
from jaxckpt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# No mid-run saves (the base checkpoint comes from --stop-at-step), no eval, no progress bar: the
# subprocess's tail after the first step is a few steps and one final save. A metrics row every step
# (none of these change the compiled step) times the steps after the first.
DEFAULT_OVERRIDES = ["checkpoint.every_steps=0", "train.eval_every=0", "train.progress=false", "train.log_every=1"]
TARGET = 0.5
PARTS = ("startup", "build", "restore", "prep", "first_step")
COLUMNS = {  # metric -> column title
    "latency": "**latency** s", "startup": "startup s", "build": "build s", "restore": "restore s",
    "prep": "prep s", "first_step": "first step s", "step": "later step s", "no_exec": "latency − later step s",
    "popen_first": "Popen→first step s",
    "popen_exit": "Popen→exit s", "start_skew": "process_start − Popen s",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.py", help="config file (default: configs/small.py)")
    p.add_argument("--reps", type=int, default=3, help="cold and warm restarts each (default 3)")
    p.add_argument("--ckpt-step", type=int, default=2, help="step of the checkpoint restarts resume from")
    p.add_argument("--steps", type=int, default=3, help="steps each restart trains after resuming (default 3)")
    p.add_argument("--dir", type=Path, default=None, help="parent of the scratch dir (default: system temp)")
    p.add_argument("--json", type=Path, help="also write the raw per-restart numbers here")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (applied last)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.steps < 1 or args.ckpt_step < 1:
        p.error("--reps, --steps and --ckpt-step must be >= 1")
    return args


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxckpt.cli", *args]


@dataclass
class Bench:
    """The scratch layout and the one train command every run shares (but for the cache dir)."""

    root: Path
    config: Path
    overrides: list[str]
    ckpt_step: int
    log: list[str] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return self.root / "base"

    def train_cmd(self, workdir: Path, cache: Path, stop_at: int | None = None) -> list[str]:
        stop = ["--stop-at-step", str(stop_at)] if stop_at is not None else []
        return cli("train", "--config", str(self.config), "--workdir", str(workdir), *stop,
                   *self.overrides, f"train.compilation_cache={cache}")


def run_logged(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``cmd`` with stdout+stderr to ``log``; (wall time just before Popen, after exit, return code)."""
    with open(log, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        rc = proc.wait()
        return t0, time.time(), rc


def fail(msg: str, log: Path) -> None:
    """Stop with ``msg`` and the end of the run's log (the scratch dir holding it is deleted on the way out)."""
    tail = log.read_text(errors="replace")[-4000:]
    raise SystemExit(f"restart.py: {msg}\n--- {log.name} (last 4000 characters) ---\n{tail}")


def check(rc: int, cmd: list[str], log: Path) -> None:
    if rc != 0:
        fail(f"command failed (exit {rc}): {' '.join(cmd)}", log)


def dataset(bench: Bench) -> str:
    """``jaxckpt prepare`` tinyshakespeare into the scratch dir, or '' (the default corpus) without it."""
    if not benchlib.SHAKESPEARE.is_file():
        bench.log.append(f"{benchlib.SHAKESPEARE} not found: data.path='' (the default corpus)")
        return ""
    out = bench.root / "data"
    cmd = cli("prepare", "--input", str(benchlib.SHAKESPEARE), "--out", str(out))
    _, _, rc = run_logged(cmd, bench.root / "prepare.log")
    check(rc, cmd, bench.root / "prepare.log")
    bench.log.append(" ".join(cmd))
    return str(out)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_segment(workdir: Path) -> dict[str, dict[str, Any]]:
    """The events of the newest process in ``workdir/events.jsonl`` (the copy also holds the base run's)."""
    events = read_jsonl(workdir / "events.jsonl")
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    seg = events[starts[-1]:] if starts else []
    return {e["event"]: e for e in seg}


def step_time(workdir: Path, start: dict[str, Any], first_step: int) -> float:
    """Median time of the steps after the first: gaps between this process's per-step metrics rows."""
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["time"] >= start["time"] and r["step"] >= first_step]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def measure(ev: dict[str, dict[str, Any]], step_s: float, t_popen: float, t_exit: float) -> dict[str, float]:
    """Latency and its parts (see the module docstring) from one restart's events."""
    start, restore, first = ev["start"], ev["restore"], ev["first_step"]
    p0 = start["process_start"]
    return {
        "latency": first["time"] - p0,
        "startup": start["time"] - p0,
        "build": restore["time"] - restore["seconds"] - start["time"],
        "restore": restore["seconds"],
        "prep": first["time"] - first["seconds"] - restore["time"],
        "first_step": first["seconds"],
        "step": step_s,
        "no_exec": first["time"] - p0 - step_s,
        "popen_first": first["time"] - t_popen,
        "popen_exit": t_exit - t_popen,
        "start_skew": p0 - t_popen,
    }


def tree_mb(path: Path) -> tuple[float, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6, len(files)


def restart(bench: Bench, name: str, cache: Path) -> dict[str, float]:
    """Resume a fresh copy of the base workdir in a subprocess; its timings (the copy is deleted after)."""
    workdir = bench.root / "runs" / name
    shutil.copytree(bench.base, workdir)
    cmd = bench.train_cmd(workdir, cache)
    log = bench.root / "runs" / f"{name}.log"
    t0, t1, rc = run_logged(cmd, log)
    check(rc, cmd, log)
    ev = last_segment(workdir)
    if "restore" not in ev or ev["restore"]["step"] != bench.ckpt_step or "first_step" not in ev:
        fail(f"{name}: did not resume from step {bench.ckpt_step} and train (its events: {sorted(ev)})", log)
    step_s = step_time(workdir, ev["start"], ev["first_step"]["step"])
    shutil.rmtree(workdir)
    return measure(ev, step_s, t0, t1)


def setup(args: argparse.Namespace, root: Path) -> Bench:
    """Dataset, the base checkpoint at step ``--ckpt-step``; returns the shared command's pieces."""
    config = Path(args.config)
    if not config.is_file() and (REPO / config).is_file():
        config = REPO / config  # e.g. the default, run from outside the repo root
    ours = [*DEFAULT_OVERRIDES, f"train.steps={args.ckpt_step + args.steps}"]
    try:
        cfg = load_config(config, [*ours, *args.overrides])  # a bad override fails here, before any run
    except ConfigError as e:
        raise SystemExit(f"restart.py: error: {e}") from None
    if cfg.train.steps <= args.ckpt_step:
        raise SystemExit(f"train.steps={cfg.train.steps} leaves no step to run after resuming at {args.ckpt_step}")
    bench = Bench(root, config.resolve(), [], args.ckpt_step)
    data = dataset(bench)
    bench.overrides = [*ours, f"data.path={data}", *args.overrides]
    cmd = bench.train_cmd(bench.base, root / "cache-base", stop_at=args.ckpt_step)
    bench.log.append(" ".join(cmd))
    progress(f"base run: training to step {args.ckpt_step} and saving it")
    _, _, rc = run_logged(cmd, root / "base.log")
    check(rc, cmd, root / "base.log")
    shutil.rmtree(root / "cache-base")
    (root / "runs").mkdir()
    return bench


def progress(msg: str) -> None:
    print(f"[restart] {msg}", file=sys.stderr, flush=True)


Runs = dict[str, dict[str, float]]  # "cold 1" / "warm 1" / "priming" -> metrics


def run_reps(bench: Bench, reps: int) -> tuple[Runs, dict[str, float]]:
    """Priming, then cold and warm restarts in ABBA order; also returns the caches' sizes."""
    warm = bench.root / "cache-warm"
    runs: Runs = {"priming": restart(bench, "priming", warm)}
    progress(f"priming: {runs['priming']['latency']:.1f} s to first step (fills {warm.name})")
    sizes = dict(zip(("warm_mb", "warm_files"), tree_mb(warm), strict=True))
    for i in range(1, reps + 1):
        for kind in ("cold", "warm") if i % 2 else ("warm", "cold"):
            cache = warm if kind == "warm" else bench.root / f"cache-cold{i}"
            runs[f"{kind} {i}"] = restart(bench, f"{kind}{i}", cache)
            if kind == "cold":
                sizes["cold_mb"], sizes["cold_files"] = tree_mb(cache)
                shutil.rmtree(cache)
            progress(f"{kind} {i}/{reps}: {runs[f'{kind} {i}']['latency']:.1f} s to first step")
    return runs, sizes


def median(runs: Runs, kind: str, key: str) -> float:
    return statistics.median(m[key] for name, m in runs.items() if name.startswith(kind))


def table(runs: Runs) -> list[str]:
    lines = ["| restart | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    row = lambda name, vals: f"| {name} | " + " | ".join(vals) + " |"
    for name, m in runs.items():
        label = "priming (empty cache; fills the warm one)" if name == "priming" else name
        lines.append(row(label, [f"{m[k]:.2f}" for k in COLUMNS]))
    for kind in ("cold", "warm"):
        lines.append(row(f"**median {kind}**", [f"{median(runs, kind, k):.2f}" for k in COLUMNS]))
    ratios = [median(runs, "warm", k) / median(runs, "cold", k) if median(runs, "cold", k) > 0 else float("nan")
              for k in COLUMNS]
    lines.append(row("**warm / cold**", [f"{r:.2f}" if k != "start_skew" else "-" for k, r in zip(COLUMNS, ratios,
                                                                                                   strict=True)]))
    return lines


def shares(runs: Runs, kind: str) -> str:
    total = median(runs, kind, "latency")
    parts = sorted(((median(runs, kind, p), p) for p in PARTS), reverse=True)
    return f"{kind} {total:.2f} s = " + " + ".join(f"{p.replace('_', ' ')} {v:.2f} ({v / total:.0%})" for v, p in parts)


def verdict(runs: Runs, reps: int) -> list[str]:
    ratio = median(runs, "warm", "latency") / median(runs, "cold", "latency")
    pairs = [runs[f"warm {i}"]["latency"] / runs[f"cold {i}"]["latency"] for i in range(1, reps + 1)]
    popen = median(runs, "warm", "popen_first") / median(runs, "cold", "popen_first")
    no_exec = median(runs, "warm", "no_exec") / median(runs, "cold", "no_exec")
    skew = statistics.median(m["start_skew"] for m in runs.values())
    return [
        f"restart latency (process start -> first step after resume), median warm / median cold = **{ratio:.2f}** "
        f"({median(runs, 'warm', 'latency'):.2f} s / {median(runs, 'cold', 'latency'):.2f} s); "
        f"per pair (warm i / cold i): {', '.join(f'{r:.2f}' for r in pairs)}",
        f"target warm <= {TARGET}x cold: {'PASS' if ratio <= TARGET else 'FAIL'}",
        f"without one step's execution (latency − later step): warm / cold = {no_exec:.2f} "
        f"({median(runs, 'warm', 'no_exec'):.2f} s / {median(runs, 'cold', 'no_exec'):.2f} s)",
        f"cross-check from the parent's clock: Popen -> first step, warm / cold = {popen:.2f}; "
        f"process_start - Popen: median {skew:+.3f} s over all {len(runs)} restarts",
        "where the time goes (medians): " + shares(runs, "cold") + "; " + shares(runs, "warm"),
    ]


def report(args: argparse.Namespace, bench: Bench, runs: Runs, sizes: dict[str, float], load: str) -> str:
    ckpt_mb, _ = tree_mb(bench.base / "checkpoints")
    restart_cmd = " ".join(bench.train_cmd(Path("COPY_OF_BASE_WORKDIR"), Path("CACHE_DIR")))
    return "\n".join([
        f"config {args.config}; resume from step {args.ckpt_step}, then {args.steps} step(s), final save, exit; "
        f"{args.reps} cold + {args.reps} warm restarts (ABBA order) after 1 priming restart; checkpoint "
        f"{ckpt_mb:.0f} MB; warm cache {sizes['warm_mb']:.1f} MB in {sizes['warm_files']:.0f} files (a cold run "
        f"writes {sizes.get('cold_mb', 0):.1f} MB); load average before / after: {load} / {loadavg()}",
        "", "set-up commands:", *(f"    {c}" for c in bench.log),
        "restart command (cold: CACHE_DIR = a new empty dir each time; warm: the primed dir):",
        f"    {restart_cmd}", "", *table(runs), "", *verdict(runs, args.reps),
    ])


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = loadavg()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-bench-restart-", dir=args.dir))
    try:
        bench = setup(args, root)
        runs, sizes = run_reps(bench, args.reps)
        print(report(args, bench, runs, sizes, load))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    progress(f"done in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"dir": str(args.dir), "json": str(args.json)},
                                         "overrides": bench.overrides, "runs": runs, "sizes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
