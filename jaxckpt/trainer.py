"""The training loop: the one place that knows the order of operations.

Per step: maybe save (state + data iterator, *before* drawing the next batch) -> next batch ->
jitted step -> log. Resume restores state, iterator and RNG from the newest good checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxckpt import aot, gcpause, malloc
from jaxckpt import resume as resume_lib
from jaxckpt.checkpoint import Checkpointer
from jaxckpt.config import Config
from jaxckpt.data import DataPipeline
from jaxckpt.lock import WorkdirLock
from jaxckpt.mesh import describe, make_mesh
from jaxckpt.metrics import EventLog, MetricsWriter, log, route_library_logs
from jaxckpt.model import param_count
from jaxckpt.optim import make_optimizer, make_schedule
from jaxckpt.preemption import Preempted, PreemptionGuard
from jaxckpt.state import ModelDef, abstract_state, state_shapes, state_shardings
from jaxckpt.step import jit_eval_step, jit_train_step, on_gpu

PyTree = Any


@dataclass
class Run:
    """Everything built from a config before the loop starts."""

    cfg: Config
    workdir: Path
    mesh: Any
    mdef: ModelDef
    tx: Any
    schedule: Any
    shardings: PyTree
    data: DataPipeline
    step_fn: Any = None
    eval_fn: Any = None
    shapes: PyTree = None  # the state's ShapeDtypeStructs (state_shapes), traced once here
    executables: Path | None = None  # where compiled train steps are kept (jaxckpt.aot); None = off
    prefetch: aot.Prefetch | None = None  # the stored train step, loading on a thread
    last_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: Config, workdir: Path) -> Run:
        mesh = make_mesh(cfg.mesh)
        mdef = ModelDef.build(cfg.model)
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        schedule = make_schedule(cfg.optim, cfg.train.steps)
        shapes = state_shapes(mdef, tx)
        shardings = state_shardings(mdef, tx, mesh, shapes)
        data = DataPipeline(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, mesh)
        run = cls(cfg, Path(workdir), mesh, mdef, tx, schedule, shardings, data, shapes=shapes)
        run.step_fn = jit_train_step(mdef, tx, schedule, mesh, shardings, cfg.train.deterministic)
        run.eval_fn = jit_eval_step(mdef, mesh, shardings["params"], cfg.train.deterministic)
        return run

    def abstract_state(self) -> PyTree:
        return abstract_state(self.mdef, self.tx, self.mesh, self.shapes, self.shardings)

    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.model.seq_len


@dataclass
class TrainResult:
    step: int
    state: PyTree
    metrics: dict[str, float]
    stopped_early: bool


def summary(run: Run, n_params: int, start_step: int) -> str:
    devs = jax.devices()
    return (
        f"{len(devs)} x {devs[0].platform} device(s) in {jax.process_count()} process(es); "
        f"mesh {describe(run.mesh)}; {n_params:,} params; {run.tokens_per_step():,} tokens/step; "
        f"steps {start_step}->{run.cfg.train.steps}; data {run.data.describe()}"
    )


def determinism_note(cfg: Config) -> str | None:
    """A start-up line saying what ``train.deterministic`` does on this machine (None where it does nothing)."""
    if not on_gpu():
        return None
    if cfg.train.deterministic:
        return ("train.deterministic: XLA's deterministic GPU kernels, no autotuning; a resume that recompiles "
                "the step continues bit for bit. train.deterministic=false is faster (1.34x on an H200, "
                "benchmarks/README.md §6)")
    return ("train.deterministic=false: autotuned GPU kernels; a resume is bit-exact only while the compiled "
            "step comes from the cache")


def evaluate(run: Run, params: PyTree, batches: list[jax.Array]) -> float:
    losses = [run.eval_fn(params, b) for b in batches]
    return float(np.mean(jax.device_get(losses)))


def process_start_time() -> float:
    """When this process started (for restart latency and goodput), from the OS; now if unknown.

    Linux gives the start in clock ticks since boot; it is placed on the wall clock through
    ``CLOCK_BOOTTIME`` (10 ms resolution). psutil adds it to ``/proc/stat``'s whole-second boot time
    instead, which puts the start up to a second early (0.4 s on the benchmark machine)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after "(comm)"
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc or no CLOCK_BOOTTIME (not Linux)
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or failing: fall back to now
        return time.time()


def enable_compilation_cache(setting: str) -> Path | None:
    """JAX's persistent compilation cache ("auto" = the user cache dir; "" = off); returns its directory."""
    if not setting or (jax.process_count() > 1 and jax.default_backend() == "cpu"):
        # CPU cache keys include the device assignment, so only process 0 would hit the cache; the
        # other processes then reach the first collective >30 s later and gloo's fixed timeout fires.
        return None
    from jaxckpt.data import cache_dir

    path = cache_dir() / "xla" if setting == "auto" else Path(setting)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def train(cfg: Config, workdir: Path, stop_at: int | None = None) -> TrainResult:
    """Train to ``cfg.train.steps`` (or save and stop at ``stop_at``), resuming if possible.

    Raises ``Preempted`` after saving when SIGTERM/SIGINT arrives. Cyclic garbage collection is paused from
    here until the first step has run, and what start-up left alive is then frozen (jaxckpt.gcpause).
    """
    gcpause.begin_start_up()  # until the first step has run (or start-up fails)
    try:
        return _train(cfg, Path(workdir).absolute(), stop_at)
    finally:
        gcpause.end_start_up(freeze_alive=False)


def _train(cfg: Config, workdir: Path, stop_at: int | None) -> TrainResult:
    workdir.mkdir(parents=True, exist_ok=True)
    cache = enable_compilation_cache(cfg.train.compilation_cache)
    executables = cache / "executables" if cache is not None else None
    with (PreemptionGuard() as guard, WorkdirLock(workdir),
          aot.Prefetch("train_step", step_program(cfg), executables) as prefetch):  # loads while we build, restore
        route_library_logs(workdir)
        events = EventLog(workdir)
        events.emit("start", process_start=process_start_time(), processes=jax.process_count(),
                    devices=jax.device_count(), allocator=malloc.in_use())
        run = Run.build(cfg, workdir)
        run.executables, run.prefetch = executables, prefetch
        resume_lib.prepare_dir(cfg, workdir)
        with Checkpointer(workdir / "checkpoints", cfg.checkpoint, on_event=events.emit) as ckpt:
            t0 = time.perf_counter()
            start = resume_lib.start_state(run, ckpt)
            events.emit("restore" if start.resumed_from is not None else "init", step=start.step,
                        seconds=time.perf_counter() - t0)
            log(summary(run, param_count(start.state["params"]), start.step))
            for note in (determinism_note(cfg), malloc.describe() if jax.default_backend() == "cpu" else None):
                if note:
                    log(note)
            writer = MetricsWriter(workdir, cfg.train.tensorboard, cfg.train.progress, cfg.train.steps, start.step)
            try:
                result = loop(run, ckpt, writer, start, guard, stop_at, events)
            except Preempted as e:
                events.emit("preempted", step=e.step)
                raise
            finally:
                writer.close()
                getattr(start.iterator, "close", lambda: None)()
        events.emit("end", step=result.step)
        return result


def step_program(cfg: Config) -> dict[str, Any]:
    """The settings the compiled train step depends on (beyond its argument shapes and shardings)."""
    d = cfg.to_dict()
    return {"model": d["model"], "optim": d["optim"], "mesh": d["mesh"], "train.steps": cfg.train.steps,
            "data.batch_size": cfg.data.batch_size, "train.deterministic": cfg.train.deterministic}


def first_step(step_fn: Any, state: PyTree, batch: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]:
    """The process's first step, waited for. Just before it, the host allocator hands back what start-up freed
    (init's or a restore's buffers), keeping on CPU room for the step's temporaries twice over and its outputs
    (:func:`jaxckpt.malloc.release_free_memory`). On the CPU backend the step runs as a step beside a save
    does: a save's snapshot holds zero-copy views of the state (jaxckpt.d2h), so that step cannot donate it
    and XLA allocates a second state. Holding views here makes that first allocation now, in a step that
    compiles anyway, instead of in the first step beside the first save. Same values either way."""
    on_cpu = jax.default_backend() == "cpu"
    keep = step_blocks(step_fn, state, batch) if on_cpu else ()
    if malloc.release_free_memory(keep) and keep:
        log(f"host allocator: start-up's free memory handed back; kept {' + '.join(f'{n / 1e6:,.0f}' for n in keep)} "
            "MB for the steps (temporaries of two at once, outputs)")
    views = [np.asarray(shard.data) for x in jax.tree.leaves(state) for shard in x.addressable_shards] if on_cpu else []
    out = jax.block_until_ready(step_fn(state, batch))
    del views
    return out


def step_blocks(step_fn: Any, state: PyTree, batch: jax.Array) -> tuple[int, ...]:
    """(temporaries, temporaries, outputs) in bytes of one call of the compiled step, from XLA's memory analysis;
    () if unknown. A jitted ``step_fn`` is compiled here, and its first call then takes it from JAX's cache."""
    try:
        compiled = step_fn if hasattr(step_fn, "memory_analysis") else step_fn.lower(state, batch).compile()
        stats = compiled.memory_analysis()
        temps, outputs = int(stats.temp_size_in_bytes), int(stats.output_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return ()
    return (temps, temps, outputs)


def save(run: Run, ckpt: Checkpointer, step: int, state: PyTree, start: resume_lib.Start,
         paced: bool = False) -> None:
    """Save ``step``; ``paced`` for the periodic saves that training runs beside (checkpoint.write_mb_s)."""
    meta = resume_lib.checkpoint_meta(run, step, start.offset, run.last_metrics)
    ckpt.save(step, state, start.iterator, meta, paced=paced)


def loop(run: Run, ckpt: Checkpointer, writer: MetricsWriter, start: resume_lib.Start,
         guard: PreemptionGuard, stop_at: int | None, events: EventLog) -> TrainResult:
    cfg = run.cfg.train
    state, step, it = start.state, start.step, start.iterator
    eval_batches = run.data.eval_batches(cfg.eval_batches) if cfg.eval_every else []
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    t_last, step_last = time.perf_counter(), step
    while step < end:
        if guard.should_stop(step):
            if ckpt.schedule.last_save_step != step:
                save(run, ckpt, step, state, start)
            ckpt.wait()
            raise Preempted(step, guard.signame or "a preemption notice (SIGTERM, via JAX)")
        if ckpt.should_save(step):
            save(run, ckpt, step, state, start, paced=True)
        batch = run.data.to_global(next(it))
        if step == start.step:  # the first step compiles (or loads from the cache): time it
            t_first = time.perf_counter()
            step_fn = aot.compiled(run.step_fn, (state, batch), "train_step", step_program(run.cfg), run.executables,
                                   run.prefetch)
            state, metrics = first_step(step_fn, state, batch)
            events.emit("first_step", step=step + 1, seconds=time.perf_counter() - t_first)
            gcpause.end_start_up()
        else:
            state, metrics = step_fn(state, batch)
        step += 1
        do_eval = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)
        if do_eval or step % cfg.log_every == 0 or step == end:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            scalars["tokens_per_s"] = (step - step_last) * run.tokens_per_step() / max(now - t_last, 1e-9)
            if do_eval:
                scalars["eval_loss"] = evaluate(run, state["params"], eval_batches)
            t_last, step_last = time.perf_counter(), step
            run.last_metrics = {**run.last_metrics, **scalars}
            writer.write(step, scalars)
            writer.progress(step, {"loss": scalars["loss"], "tok/s": scalars["tokens_per_s"]})
        ckpt.poll()
    if run.cfg.checkpoint.enabled and ckpt.schedule.last_save_step != step:
        save(run, ckpt, step, state, start)
    ckpt.wait()
    return TrainResult(step, state, dict(run.last_metrics), step < cfg.steps)
