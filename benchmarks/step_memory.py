"""Where a CPU train step's memory goes: page faults per step, the first call, and what a save's snapshot
costs the step after it. Each setting runs in child processes, in turn, and is compared in one run.

    python benchmarks/step_memory.py                   # configs/small.py, 3 children per setting (~4 min)
    python benchmarks/step_memory.py --rounds 1 model.n_layers=2      # quick
    python benchmarks/step_memory.py --settings default,xla-default,no-ynn   # XLA:CPU's fusion choices only

Settings (each child's environment, read at its start); the ``jaxckpt`` command trains under the second:

* ``glibc``  — glibc's malloc, and as the trainer compiles by default: XLA:CPU's YNNPACK dot fusions
  (``jaxckpt.step.CPU_YNN_FUSIONS``: each matmul with the elementwise work around it).
* ``tcmalloc`` — TCMalloc preloaded as ``jaxckpt.malloc`` does it (``LD_PRELOAD``,
  ``TCMALLOC_RELEASE_RATE=0``): freed blocks stay with the allocator for the next step.
* ``xla-default`` — ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot``: XLA's own default,
  one YNNPACK call per matmul (the trainer then leaves the choice to XLA_FLAGS).
* ``hugetlb``  — ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc asks for transparent huge pages on the
  memory it maps. XLA:CPU allocates each call's temporaries in one block and frees it afterwards; past
  glibc's mmap threshold (at most 32 MiB), or from any thread but the main one, that block is a fresh
  mapping every step, faulted in 4 KiB pages.
* ``one-arena`` — ``mallopt`` at the child's start, before JAX makes threads: one arena, no mmap, no
  trimming below 2 GiB. The block then comes from the heap and the next call reuses it.
* ``no-ynn`` — ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``: XLA:CPU without its YNNPACK
  fusions, whose set-up the first call of a compiled step pays. (Both XLA_FLAGS settings are added to any
  XLA_FLAGS already set.)

Per child (the trainer's ``Run.build`` step, ``create_state``, one pre-built batch, as ``benchmarks/step.py``):
the first call of the compiled step; ``--steps`` later calls (median wall s, minor page faults, user and
system CPU s per call); then a call while zero-copy host views of every state leaf are held, as
``jaxckpt.d2h.Snapshot`` holds them on the CPU backend while a save runs (the step's donation of the state
then fails, so XLA allocates a new state), ``--held`` times, each followed by a call without them; RSS
after the later calls, at the end, and at its peak (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxckpt import malloc

YNN = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_experimental_ynn_fusion_type=".strip()
SETTINGS = {"glibc": {}, "tcmalloc": {"STEP_MEMORY_TCMALLOC": "1"},
            "xla-default": {"XLA_FLAGS": YNN + "individual_dot"},
            "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
            "one-arena": {"STEP_MEMORY_MALLOPT": "1"}, "no-ynn": {"XLA_FLAGS": YNN}}
# mallopt(3) parameters for "one-arena": M_ARENA_MAX=1, M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB - 1 (its maximum).
ONE_ARENA = ((-8, 1), (-4, 0), (-1, 2**31 - 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.py", help="config file (default: configs/small.py)")
    p.add_argument("--rounds", type=int, default=3, help="children per setting, alternating (default 3)")
    p.add_argument("--steps", type=int, default=8, help="later calls timed per child (default 8)")
    p.add_argument("--held", type=int, default=4, help="calls with snapshot views held per child (default 4)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}; "
                   "the first is the reference")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_args(argv)


def timed_call(fn: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    import jax

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return out, {"wall": wall, "faults": r1.ru_minflt - r0.ru_minflt,
                 "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime}


def apply_one_arena() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if not all(libc.mallopt(param, value) == 1 for param, value in ONE_ARENA):
        raise SystemExit("mallopt failed")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process's measurements (see the module docstring), as JSON on stdout."""
    if os.environ.get("STEP_MEMORY_MALLOPT"):
        apply_one_arena()  # before JAX (or numpy's BLAS) starts its threads
    if (malloc.in_use() == "tcmalloc") != bool(os.environ.get("STEP_MEMORY_TCMALLOC")):
        raise SystemExit(f"step_memory.py: the child runs on {malloc.in_use()}, not the setting's allocator")
    import jax
    import numpy as np

    try:  # run as a file (benchmarks/ is sys.path[0]), or imported as benchmarks.<name> from the repo root
        from benchlib import proc_status_mb
    except ImportError:
        from benchmarks.benchlib import proc_status_mb

    from jaxckpt.config import load_config
    from jaxckpt.state import create_state
    from jaxckpt.trainer import Run

    cfg = load_config(args.config, list(args.overrides))
    with tempfile.TemporaryDirectory(prefix="jaxckpt-bench-step-memory-") as tmp:
        run = Run.build(cfg, Path(tmp))  # writes nothing there: only the step, the state and one batch are used
    state = create_state(run.mdef, run.tx, run.mesh, cfg.train.seed)
    batch = run.data.to_global(next(run.data.train_iterator(0)))
    step = run.step_fn.lower(state, batch).compile()
    (state, _), first = timed_call(step, state, batch)
    later = []
    for _ in range(args.steps):
        (state, _), t = timed_call(step, state, batch)
        later.append(t)
    out = {"first": first, "later": _median(later), "rss_later": proc_status_mb("VmRSS")}
    held, beside, donated = [], [], []
    for _ in range(args.held):  # a call with the views held, then one without, alternating
        leaves = jax.tree.leaves(state)
        views = [np.asarray(x.addressable_data(0)) for x in leaves]  # what a CPU Snapshot holds
        (state, _), t = timed_call(step, state, batch)
        held.append(t)
        donated.append(leaves[0].is_deleted())
        del views, leaves
        (state, _), t = timed_call(step, state, batch)
        beside.append(t)
    slowest = max(t["wall"] for t in later + held + beside)
    return out | {"held": _median(held), "beside": _median(beside), "rss_end": proc_status_mb("VmRSS"),
                  "rss_peak": proc_status_mb("VmHWM"), "slowest": slowest, "donated": any(donated),
                  "n_held": len(held)}


def _median(calls: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(t[k] for t in calls) for k in calls[0]}


def glibc_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """``env`` without glibc tunables, a TCMalloc preload (this script may itself run under one) or a
    ``JAXCKPT_MALLOC`` choice (which would keep the ``tcmalloc`` setting from preloading it)."""
    preload = " ".join(p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "libtcmalloc" not in p)
    out = {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", malloc.TRIED, malloc.ENV)
           and not k.startswith("TCMALLOC_")}
    return out | ({"LD_PRELOAD": preload} if preload else {})


def run_child(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    env = glibc_env(os.environ) | SETTINGS[setting]
    if setting == "tcmalloc":
        lib = malloc.find_tcmalloc()
        if lib is None:
            raise SystemExit(f"step_memory.py: TCMalloc is not installed ({malloc.INSTALL})")
        env = malloc.preload_env(env, lib)
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--rounds", "1",
           "--steps", str(args.steps), "--held", str(args.held), *args.overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


COLUMNS = ("setting", "first call s", "later call s", "faults per later call", "user s", "sys s",
           "call with snapshot views held s", "donated", "call after it s", "slowest call after the first s",
           "RSS after the later calls MB", "RSS at the end MB", "peak RSS MB")


def report(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    def med(setting: str, part: str, key: str | None = None) -> float:
        return statistics.median(r[part][key] if key else r[part] for r in results[setting])

    def row(s: str) -> str:
        cells = [s, f"{med(s, 'first', 'wall'):.3f}", f"{med(s, 'later', 'wall'):.3f}",
                 f"{med(s, 'later', 'faults'):,.0f}", f"{med(s, 'later', 'user'):.2f}", f"{med(s, 'later', 'sys'):.2f}",
                 f"{med(s, 'held', 'wall'):.3f}", "yes" if any(r["donated"] for r in results[s]) else "no",
                 f"{med(s, 'beside', 'wall'):.3f}", f"{max(r['slowest'] for r in results[s]):.3f}",
                 f"{med(s, 'rss_later'):,.0f}", f"{med(s, 'rss_end'):,.0f}", f"{med(s, 'rss_peak'):,.0f}"]
        return "| " + " | ".join(cells) + " |"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), *map(row, results)]
    ref = next(iter(results))
    for s in list(results)[1:]:
        later = med(s, "later", "wall") / med(ref, "later", "wall")
        first = med(s, "first", "wall") / med(ref, "first", "wall")
        lines.append(f"{s} / {ref} (medians over children): later call {later:.2f}x, first call {first:.2f}x")
    for s in results:
        each = ", ".join(f"{r['held']['wall'] - r['beside']['wall']:+.3f}" for r in results[s])
        cost = med(s, "held", "wall") - med(s, "beside", "wall")
        lines.append(f"{s}: call with views held - call after it = {cost:+.3f} s "
                     f"(per child, medians of {results[s][0]['n_held']}: {each})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    settings = args.settings.split(",")
    if not settings or any(s not in SETTINGS for s in settings):
        raise SystemExit(f"step_memory.py: --settings takes a comma-separated list of {', '.join(SETTINGS)}")
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
    for i in range(args.rounds):
        for s in (settings if i % 2 == 0 else settings[::-1]):  # ABCD, DCBA, ...
            results[s].append(run_child(args, s))
            print(f"[step_memory] round {i + 1}/{args.rounds}: {s} done", file=sys.stderr)
    print(f"config {args.config} {' '.join(args.overrides)}; {args.rounds} children per setting, "
          f"{args.steps} later calls each; CPU backend")
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
