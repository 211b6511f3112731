"""Is the trainer's train step bitwise reproducible here, with and without ``train.deterministic``, and at what cost?

    python benchmarks/determinism.py --config configs/gpt125m.py --batch 16     # on a GPU
    python benchmarks/determinism.py --config configs/tiny.py --steps 3         # smoke test, any machine

Exact resume needs the step to compute the same bits every time it runs on the same state and batch. Two
ways a GPU can break that (XLA's docs/determinism.md), one check for each, per setting:

* replay: one executable run twice from the same initial state over the same batches, in one process.
  Differs when a kernel is not deterministic (atomics: scatter-add in the embedding gradient, ...).
* recompile: ``--processes`` fresh processes (no compilation cache) compile the step and replay it.
  Differs when the compile is not (XLA:GPU's autotuner times candidate kernels and keeps the fastest).
  A resume that misses the compiled-step caches (another machine, a jaxckpt upgrade) recompiles.

Each setting is the trainer's own step (``jaxckpt.step``) compiled with its XLA options: ``off`` and
``deterministic`` are ``train.deterministic=false`` and ``true``; the others are candidates, not trainer
settings: ``exclude-ops`` (deterministic kernels, still autotuned), and ``+cache`` (XLA's per-fusion autotune
results kept in a directory the processes share, as a workdir could be).
Step time: the median of ``--repeats`` runs of ``--steps`` steps, against ``off``. On CPUs every setting is
the same program (the options are GPU-only), so this only smoke-tests the script there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.mfu import build_step  # noqa: E402
from jaxckpt.config import Config, load_config  # noqa: E402
from jaxckpt.mesh import batch_sharding  # noqa: E402
from jaxckpt.state import create_state  # noqa: E402
from jaxckpt.step import GPU_DETERMINISTIC, on_gpu  # noqa: E402

EXCLUDE = {"xla_gpu_exclude_nondeterministic_ops": True}
MODES = {"off": {}, "deterministic": GPU_DETERMINISTIC, "exclude-ops": EXCLUDE, "exclude-ops+cache": EXCLUDE,
         "off+cache": {}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gpt125m.py")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: the config's)")
    p.add_argument("--steps", type=int, default=8, help="steps per replay and per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    p.add_argument("--processes", type=int, default=2, help="fresh processes that compile and replay")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one process's results go here
    p.add_argument("--autotune-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_args(argv)


def options(mode: str, autotune_dir: Path | None) -> dict[str, Any]:
    """XLA options for ``mode``; none off a GPU (they are XLA:GPU's), where every mode is the same program."""
    if not on_gpu():
        return {}
    cache = {"xla_gpu_per_fusion_autotune_cache_dir": str(autotune_dir)} if mode.endswith("+cache") else {}
    return {**MODES[mode], **cache}


def digest(tree: Any) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        h.update(np.ascontiguousarray(leaf).view(np.uint8).tobytes())
    return h.hexdigest()[:16]


class Bench:
    """The trainer's step for ``cfg``, its initial state (kept on the host) and ``steps`` synthetic batches."""

    def __init__(self, cfg: Config, steps: int):
        self.mesh, mdef, tx, self.step_fn = build_step(cfg)
        state = create_state(mdef, tx, self.mesh, cfg.train.seed)
        self.shardings = jax.tree.map(lambda x: x.sharding, state)
        self.host_state = jax.device_get(state)
        shape = (cfg.data.batch_size, cfg.model.seq_len + 1)
        make = jax.jit(lambda k: jax.random.randint(k, shape, 0, cfg.model.vocab_size, jnp.int32),
                       out_shardings=batch_sharding(self.mesh))
        self.batches = [make(jax.random.key(i)) for i in range(steps)]

    def fresh_state(self) -> Any:
        return jax.device_put(self.host_state, self.shardings)  # the step donates its input: a new copy each run

    def replay(self, compiled: Any) -> dict[str, Any]:
        """Run ``compiled`` from the initial state over the batches: each step's loss bits and the final state's."""
        state, losses = self.fresh_state(), []
        for b in self.batches:
            state, metrics = compiled(state, b)
            losses.append(float(metrics["loss"]).hex())
        return {"losses": losses, "state": digest(state)}

    def time_steps(self, compiled: Any, repeats: int) -> list[float]:
        state, _ = compiled(self.fresh_state(), self.batches[0])  # warm-up
        times = []
        for _ in range(repeats):
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for b in self.batches:
                state, metrics = compiled(state, b)
            jax.block_until_ready((state, metrics))
            times.append((time.perf_counter() - t0) / len(self.batches))
        return times

    def measure(self, mode: str, repeats: int, autotune_dir: Path | None) -> dict[str, Any]:
        opts = options(mode, autotune_dir)
        t0 = time.perf_counter()
        compiled = self.step_fn.lower(self.fresh_state(), self.batches[0]).compile(compiler_options=opts or None)
        compile_s = time.perf_counter() - t0
        runs = [self.replay(compiled) for _ in range(2)]
        times = self.time_steps(compiled, repeats)
        return {"options": opts, "compile_s": compile_s, "replays": runs, "step_s": statistics.median(times),
                "step_s_all": times}


def child(args: argparse.Namespace) -> int:
    jax.config.update("jax_enable_compilation_cache", False)  # every process compiles for itself
    print(f"  {device_line()}", flush=True)
    bench = Bench(config(args), args.steps)
    out = {}
    for m in args.modes:
        t0 = time.perf_counter()
        try:
            out[m] = r = bench.measure(m, args.repeats, args.autotune_dir)
            print(f"  {m}: compile {r['compile_s']:.1f} s, step {r['step_s'] * 1e3:,.1f} ms, replay "
                  f"{first_difference(*r['replays'])}, state {r['replays'][0]['state']} "
                  f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. an XLA option this jaxlib lacks: report it, go on
            out[m] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"  {m}: {out[m]['error']}", flush=True)
        args.child.write_text(json.dumps(out))
    return 0


def device_line() -> str:
    dev = jax.devices()
    return f"{len(dev)} x {dev[0].device_kind} ({dev[0].platform}); jax {jax.__version__}"


def config(args: argparse.Namespace) -> Config:
    extra = [f"data.batch_size={args.batch}"] if args.batch else []
    base = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "train.deterministic=false"]  # options: per mode
    return load_config(args.config, [*base, *extra, *args.overrides])


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'same' if both runs agree bitwise, else the first step whose loss differs (or 'state' if only it does)."""
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"], strict=True)):
        if x != y:
            return f"step {i + 1}"
    return "same" if a["state"] == b["state"] else "state"


def report(results: list[dict[str, Any]], modes: list[str]) -> list[str]:
    ok = "off" in modes and all("step_s" in r["off"] for r in results)
    base = statistics.median(r["off"]["step_s"] for r in results) if ok else None
    lines = ["| setting | XLA options | step ms (median of processes) | vs off | compile s | replay in one process "
             "| recompile in another process |", "|---|---|---|---|---|---|---|"]
    for m in modes:
        rs = [r[m] for r in results]
        if any("error" in r for r in rs):
            lines.append(f"| {m} | failed: {next(r['error'] for r in rs if 'error' in r)} |")
            continue
        step = statistics.median(r["step_s"] for r in rs)
        rep = ", ".join(first_difference(*r["replays"]) for r in rs)
        cross = ", ".join(first_difference(rs[0]["replays"][0], r["replays"][0]) for r in rs[1:]) or "n/a"
        opts = " ".join(f"{k}={v}" for k, v in rs[0]["options"].items()) or "-"
        vs = f"{step / base:.3f}x" if base else "-"
        lines.append(f"| {m} | {opts} | {step * 1e3:,.1f} | {vs} | {statistics.median(r['compile_s'] for r in rs):.0f} "
                     f"| {rep} | {cross} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.modes = args.modes.split(",")
    if unknown := [m for m in args.modes if m not in MODES]:
        sys.exit(f"unknown --modes {', '.join(unknown)}; known: {', '.join(MODES)}")
    if args.child:
        return child(args)
    # This process only starts the others and compares: off the accelerator, so the memory stays theirs.
    jax.config.update("jax_platforms", "cpu")
    cfg = config(args)
    print(f"{args.config} batch {cfg.data.batch_size}x{cfg.model.seq_len}; {args.steps} steps per replay; "
          f"{args.processes} processes", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"p{i}.json"
            cmd = [sys.executable, __file__, "--child", str(out), "--autotune-dir", str(Path(tmp) / "autotune"),
                   "--config", args.config, "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--modes", ",".join(args.modes), *([f"--batch={args.batch}"] if args.batch else []), *args.overrides]
            env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
            subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(out.read_text()))
            print(f"process {i + 1} of {args.processes} done", flush=True)
    print("\n".join(report(results, args.modes)))
    print("replay / recompile: 'same' = every step's loss and the final state (params, optimizer state) agree "
          "bitwise; else the first step whose loss differs ('state': only the final state does)")
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
