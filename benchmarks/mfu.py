"""Model FLOPs utilisation (MFU) of the trainer's own train step on an accelerator.

    python benchmarks/mfu.py                                   # gpt125m and gpt1b on all local devices
    python benchmarks/mfu.py --configs configs/gpt125m.py --batch 64 --steps 30
    python benchmarks/mfu.py --configs configs/tiny.py --steps 3 --peak-tflops 1   # smoke test on a CPU
    python benchmarks/mfu.py --configs configs/gpt1b.py --compile-only --batch 1 model.seq_len=256  # any machine

``--compile-only`` compiles the step against abstract state (nothing is allocated or run) and prints the
compile time and XLA's memory plan: how depth, ``model.remat`` and ``model.scan_layers`` change them.

For each config this builds exactly the step the trainer runs (``jaxckpt.step.jit_train_step``: forward,
backward, AdamW update, donation of the old state, XLA's deterministic GPU kernels unless
``train.deterministic=false``) on a mesh of every local device, FSDP over all of them
(``mesh.data=1 mesh.fsdp=-1 mesh.tensor=1``), and feeds it synthetic tokens already on the devices, so the
data pipeline is not in this number (``benchmarks/step.py`` measures the trainer's overhead over this loop).

* step time: the median of ``--repeats`` runs of ``--steps`` back-to-back steps, after two warm-up steps.
* model FLOPs per token, PaLM's convention (Chowdhery et al. 2022, app. B): ``6·N + 12·L·T·d`` where N counts
  the matmul weights (attention, MLP and the unembedding, tied or not; not the embedding lookup or norms) and
  the attention term counts the full T×T scores, causal masking notwithstanding. Recomputation under
  ``model.remat`` is work the chip does but not model FLOPs, so it lowers MFU.
* MFU = model FLOP/s ÷ the chip's dense bf16 peak from its datasheet (``PEAK_TFLOPS``; ``--peak-tflops``
  overrides it), and the same against a bf16 matmul measured in this run (the chip's practical ceiling).
* XLA's own FLOP count of the compiled step (``cost_analysis``): on the CPU it matches the model count to a
  few % (tests/test_bench_cli.py checks it); on a GPU it misses the cuBLAS/cuDNN calls (0.16-0.24 on an H200);
  under ``model.scan_layers`` it counts the scanned block once, not once per layer.
* XLA's memory plan of the step (arguments + temporaries + outputs - aliased), per device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxckpt.config import Config, ModelConfig, load_config
from jaxckpt.mesh import batch_sharding, make_mesh
from jaxckpt.model import param_count
from jaxckpt.optim import make_optimizer, make_schedule
from jaxckpt.state import ModelDef, abstract_state, create_state, state_shardings
from jaxckpt.step import compiler_options, jit_train_step

# Dense bf16 TFLOP/s per chip, from vendors' datasheets; matched as substrings of device_kind, first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L4", 121.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)
DEFAULT_CONFIGS = ("configs/gpt125m.py", "configs/gpt1b.py")
# Per-chip batch (sequences) for one chip of ~80 GB, scaled by the local device count. gpt125m runs without
# rematerialisation (its plan: 47 GiB on an H200); gpt1b with its config's model.remat="block" and
# model.scan_layers=True (its plan: 30 GiB on an H200 at 16 sequences).
DEFAULT_BATCH = {"gpt125m": 32, "gpt1b": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config files to measure")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: per config, see DEFAULT_BATCH)")
    p.add_argument("--steps", type=int, default=10, help="back-to-back steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per config; the median is reported")
    p.add_argument("--peak-tflops", type=float, help="the chip's peak dense bf16 TFLOP/s (default: by device kind)")
    p.add_argument("--matmul", type=int, help="side of the bf16 matmul probe (default 8192; 1024 on CPU)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--compile-only", action="store_true", help="only compile (abstract state): time and memory plan")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides for every config")
    return p.parse_args(argv)


def peak_tflops(kind: str) -> float | None:
    return next((tf for name, tf in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def model_flops_per_token(m: ModelConfig) -> float:
    """PaLM's 6·N + 12·L·T·d, N = matmul weights incl. the unembedding."""
    n_matmul = m.n_layers * (4 * m.d_model * m.d_model + 3 * m.d_model * m.d_ff) + m.vocab_size * m.d_model
    return 6.0 * n_matmul + 12.0 * m.n_layers * m.seq_len * m.d_model


def matmul_tflops(n: int, reps: int = 10) -> float:
    """Measured bf16 matmul rate of device 0 (the practical ceiling), TFLOP/s."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    t0 = time.perf_counter()
    outs = [mm(a, b) for _ in range(reps)]
    jax.block_until_ready(outs)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build_config(path: str, args: argparse.Namespace) -> Config:
    n_dev = jax.device_count()
    batch = args.batch or DEFAULT_BATCH.get(Path(path).stem, 8) * n_dev
    overrides = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", f"data.batch_size={batch}"]
    return load_config(path, overrides + list(args.overrides))


def xla_numbers(compiled: Any) -> tuple[float | None, float | None]:
    """(FLOPs per step per device as XLA counts them, planned peak bytes per device); None where unknown."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost["flops"])
    except Exception:  # noqa: BLE001 - backends differ in what they report
        flops = None
    try:
        mem = plan_bytes(compiled.memory_analysis())
    except Exception:  # noqa: BLE001
        mem = None
    return flops, mem


def plan_bytes(m: Any) -> float:
    """XLA's planned peak bytes per device from ``memory_analysis()``: arguments + temporaries + outputs - aliased."""
    return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def build_step(cfg: Config) -> tuple[Any, Any, Any, Any]:
    """(mesh, model definition, optimizer, jitted train step) exactly as the trainer builds them."""
    mesh = make_mesh(cfg.mesh)
    mdef = ModelDef.build(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(mdef, tx, mesh)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    return mesh, mdef, tx, jit_train_step(mdef, tx, schedule, mesh, shardings, cfg.train.deterministic)


def compile_only(cfg: Config) -> dict[str, Any]:
    """Compile the train step against abstract state and batch: compile seconds and XLA's per-device plan."""
    mesh, mdef, tx, step_fn = build_step(cfg)
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.model.seq_len + 1), jnp.int32,
                                 sharding=batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract_state(mdef, tx, mesh), batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return {"compile_s": compile_s, "argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "plan_bytes": plan_bytes(m)}


def measure(cfg: Config, steps: int, repeats: int) -> dict[str, Any]:
    """Compile the train step for ``cfg`` and time it on synthetic on-device tokens."""
    mesh, mdef, tx, step_fn = build_step(cfg)
    state = create_state(mdef, tx, mesh, cfg.train.seed)
    shape = (cfg.data.batch_size, cfg.model.seq_len + 1)
    make_tokens = jax.jit(lambda k: jax.random.randint(k, shape, 0, cfg.model.vocab_size, jnp.int32),
                          out_shardings=batch_sharding(mesh))
    batches = [make_tokens(jax.random.key(i)) for i in range(2)]
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    xla_flops, xla_bytes = xla_numbers(compiled)
    for i in range(2):  # warm-up
        state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / steps)
    loss = float(metrics["loss"])
    tokens = cfg.data.batch_size * cfg.model.seq_len
    return {"params": param_count(state["params"]), "tokens_per_step": tokens, "n_devices": jax.device_count(),
            "model_flops_per_step": model_flops_per_token(cfg.model) * tokens,
            "compile_s": compile_s, "step_s": statistics.median(times),
            "step_s_all": times, "xla_flops_per_device": xla_flops, "xla_bytes_per_device": xla_bytes,
            "loss": loss}


def lead(path: str, cfg: Config, params: str) -> str:
    """The row's first cells, which say what was measured: config, params, remat, attention, batch x seq."""
    m = cfg.model
    return f"| {Path(path).stem} | {params} | {m.remat} | {m.attention} | {cfg.data.batch_size}x{m.seq_len} | "


def row(path: str, cfg: Config, r: dict[str, Any], peak: float | None, probe: float) -> str:
    n_dev, tokens, flops = r["n_devices"], r["tokens_per_step"], r["model_flops_per_step"]
    model_tf_s = flops / r["step_s"] / n_dev / 1e12  # per device
    mfu = f"**{model_tf_s / peak:.1%}**" if peak else "n/a"
    xla = f"{r['xla_flops_per_device'] * n_dev / flops:.2f}" if r["xla_flops_per_device"] else "n/a"
    mem = f"{r['xla_bytes_per_device'] / 2**30:.1f}" if r["xla_bytes_per_device"] else "n/a"
    return (lead(path, cfg, f"{r['params'] / 1e6:,.0f}M") +
            f"{r['step_s'] * 1e3:,.1f} | {tokens / r['step_s']:,.0f} | {model_tf_s:,.1f} | {mfu} | "
            f"{model_tf_s / probe:.1%} | {xla} | {mem} | {r['compile_s']:.0f} | {r['loss']:.3f} |")


HEADER = ("| config | params | remat | attention | batch x seq | step ms | tokens/s | model TFLOP/s per chip | "
          "MFU vs datasheet | vs measured matmul | XLA FLOPs / model FLOPs | XLA memory plan GiB per chip | "
          "compile s | loss |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main_compile_only(args: argparse.Namespace) -> int:
    """``--compile-only``: one row per config of compile time and XLA's memory plan; runs nothing."""
    dev, raw = jax.devices()[0], {}
    print(f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); jax {jax.__version__}\n"
          "| config | layers | remat | scan | batch x seq | compile s | XLA plan GiB | arguments GiB | temps GiB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for path in args.configs:
        cfg = build_config(path, args)
        raw[path] = r = compile_only(cfg)
        m = cfg.model
        print(f"| {Path(path).stem} | {m.n_layers} | {m.remat} | {m.scan_layers} | {cfg.data.batch_size}x{m.seq_len} "
              f"| {r['compile_s']:.1f} | {r['plan_bytes'] / 2**30:.1f} | {r['argument_bytes'] / 2**30:.1f} "
              f"| {r['temp_bytes'] / 2**30:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": dev.device_kind, "results": raw}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return main_compile_only(args)
    dev = jax.devices()[0]
    if dev.platform == "cpu" and args.configs == list(DEFAULT_CONFIGS) and not args.peak_tflops:
        print("no accelerator: MFU not measured (the default configs would take hours per step on a CPU; "
              "to smoke-test the script: --configs configs/tiny.py --peak-tflops 1)")
        return 0
    peak = args.peak_tflops or peak_tflops(dev.device_kind)
    probe_n = args.matmul or (1024 if dev.platform == "cpu" else 8192)
    probe = matmul_tflops(probe_n)
    print(f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); jax {jax.__version__}; datasheet peak "
          f"{f'{peak:,.1f} TFLOP/s dense bf16' if peak else 'unknown (pass --peak-tflops)'}; measured bf16 matmul "
          f"{probe_n}^3: {probe:,.1f} TFLOP/s" + (f" ({probe / peak:.0%} of datasheet)" if peak else ""), flush=True)
    rows, raw = [HEADER], {}
    for path in args.configs:
        cfg = build_config(path, args)
        try:
            r = measure(cfg, args.steps, args.repeats)
        except Exception as e:  # noqa: BLE001 - one config out of memory must not hide the others
            rows.append(lead(path, cfg, "-") + f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} |")
            continue
        raw[path] = r
        rows.append(row(path, cfg, r, peak, probe))
        print(rows[-1], flush=True)
    print("\n".join(rows))
    opts = compiler_options(cfg.train.deterministic)
    print(f"step ms: median of {args.repeats} runs of {args.steps} steps; model FLOPs = 6N + 12LTd per token (PaLM); "
          f"train.deterministic={cfg.train.deterministic} (XLA options: {opts or 'none'})")
    if args.json:
        args.json.write_text(json.dumps({"device": dev.device_kind, "n_devices": jax.device_count(),
                                         "peak_tflops": peak, "matmul_tflops": probe, "results": raw}, indent=1))
    return 0 if len(raw) == len(args.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
