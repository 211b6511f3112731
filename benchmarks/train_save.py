"""Training while an async checkpoint save is in flight: per-step slowdown, and goodput with a save every N steps.

    python benchmarks/train_save.py                      # configs/small.py, 4 saves + 4 plain writes: ~2 min, 2 cores
    python benchmarks/train_save.py --reps 2 --normal-steps 3 model.n_layers=2 data.batch_size=8   # quick
    python benchmarks/train_save.py model.d_model=768 model.n_layers=8 model.d_ff=3072 data.batch_size=2 \
        model.seq_len=64                                 # 76M params, 0.91 GB state: a save longer than a step
    python benchmarks/train_save.py --thread-cpu         # also: CPU seconds per thread group (XLA, TensorStore, ...)
    python benchmarks/train_save.py checkpoint.save_idle=false  # the save's threads at nice 19 only, no SCHED_IDLE
    python benchmarks/train_save.py --direct             # also: trainer.train() with saves vs without (slow)

Everything runs through the library's own path: ``Run.build(cfg, workdir)`` (the jitted, donating train
step and the Grain pipeline), ``jaxckpt.state.create_state``, and ``Checkpointer(dir, cfg.checkpoint)``
driven through ``trainer.save`` (``resume.checkpoint_meta`` + ``Checkpointer.save(step, state, iterator,
meta, paced=True)``), called *before* the next step exactly as ``trainer.loop`` does (its periodic saves
keep to ``checkpoint.write_mb_s`` on the CPU backend; the save alone, which nothing runs beside, does not).
Tinyshakespeare is prepared into a temp dir if ``/work/shared/data/tinyshakespeare.txt`` exists, else the
default corpus is used; JAX's persistent compilation cache is the trainer's (``train.compilation_cache``).

A *step* is timed as one iteration of the trainer's loop: ``next(iterator)`` + ``DataPipeline.to_global``
+ ``run.step_fn`` + ``jax.block_until_ready`` (state and metrics) + ``Checkpointer.poll()``, each step
on its own, in wall seconds and process-CPU seconds (all threads). After compiling, ``--warmup`` steps and
one save waited on with no training beside it (a process's first save pays one-off costs; reported
apart as "save alone"), windows alternate: ``--normal-steps`` steps with no save pending, a save window,
a normal window, a *plain-write window* (the control, below; ``--no-plain`` skips it), ... ending with a normal
window, so load drift on a shared machine hits every kind alike.

The control: a plain-write window holds zero-copy views of the state, as a save's snapshot does, and writes
their bytes on a thread into one file at the save's pace (``checkpoint.write_mb_s``'s windows) and priority
(``checkpoint.save_nice``, ``checkpoint.save_idle``), then ``fdatasync``; no serialization, checksums or
metadata. Its steps (timed the same way, until the write is durable) show what writing the state at all costs
the steps beside it on this machine, the floor for any checkpointer; the report sets them, and how many steps
of each kind cross the target, beside the save's.

A *save window*: ``trainer.save`` (its wall time, meta included, is the *blocking* time), then steps until the
Checkpointer reports the save complete through its ``on_event("checkpoint")`` callback (Orbax commit,
fsync, CRC32 manifest, retention; noticed by ``poll()`` after a step, as in the trainer; its ``durable``
is the library's own figure from ``save()`` to that moment). Those steps are the *overlapped* steps. If
the save is still pending after N steps, ``Checkpointer.wait()`` is timed as *wait* (the trainer's next
``save()`` would block there). A watcher thread (every 50 ms) stamps when Orbax committed
(``manager.is_saving_in_progress()`` false) and when the manifest thread ended: the library itself only
notices these at step boundaries. With ``--thread-cpu`` it also reads ``/proc/self/task/*/stat`` every 100 ms
(~1-2 % of a core) in every window and attributes CPU seconds to thread groups (XLA, TensorStore,
Orbax/manifest Python threads, main, Grain); threads that end lose their last <100 ms.

T0 = median step time of all normal windows. Slowdown = overlapped step time / T0, mean and max over all
overlapped steps; per save also against the median of its two adjacent normal windows (*local T0*); and by
the step's place in its save window (1st, 2nd, 3rd and later).
The target (steps beside a save <= 1.2x their normal time) is judged three ways: the mean; the slowest place in
the window, its mean over the saves (a cost each save adds there); and the slowest overlapped step against the
slowest of as many normal steps (the median draw of that many of them: a tail the saves add). On a shared
machine normal steps alone cross 1.2x T0 now and then, so the raw max / T0 is printed but not judged.
Goodput with a save every N (= ``checkpoint.every_steps``, or ``--every``) from the pieces measured:
``N*T0 / (N*T0 + extra)``, extra = blocking + sum(overlapped step - T0) + wait, averaged over the saves.
*Save CPU* = blocking CPU + sum(overlapped step CPU - median normal step CPU) + wait CPU (for the save
alone: its blocking + wait CPU, nothing else running); the CPU-time goodput N*C0 / (N*C0 + save CPU), C0 =
median normal-step CPU, is the steadier figure on a shared machine.

``--direct`` also runs ``jaxckpt.trainer.train()`` for ``--direct-steps`` steps (default N + 2*log_every, so
one save at step N lies inside the timed window) with checkpointing on (every N) and off, in ABBA order over
``--direct-rounds`` rounds, eval and progress bar off. Each is timed from its first metrics.jsonl row to its
last (the ``time`` column; compilation is before the first row); saves inside that window come from
events.jsonl. extra per save = (on - off) / saves, goodput = N*t_off / (N*t_off + extra per save).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

try:  # run as a file (benchmarks/ is sys.path[0]), or imported as benchmarks.<name> from the repo root
    import benchlib
except ImportError:
    from benchmarks import benchlib
from jaxckpt import malloc
from jaxckpt import resume as resume_lib
from jaxckpt import trainer as trainer_lib
from jaxckpt.checkpoint import Checkpointer, lower_this_thread
from jaxckpt.config import Config, load_config
from jaxckpt.metrics import read_jsonl
from jaxckpt.model import param_count
from jaxckpt.state import create_state
from jaxckpt.trainer import Run

SLOWDOWN_TARGET = 1.2
GOODPUT_TARGET = 0.98
# Watcher period. At 10 ms, its polling took ~7 ms of CPU per step beside the save (against <1 ms beside none),
# out of the steps it measures.
TICK_S = 0.05
SAMPLE_S = 0.1  # per-thread CPU sampling period (--thread-cpu; ~0.5-2 ms of CPU per sample)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.py", help="config file (default: configs/small.py)")
    p.add_argument("--reps", type=int, default=4, help="save windows (each followed by a normal window)")
    p.add_argument("--normal-steps", type=int, default=4, help="steps per no-save window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    p.add_argument("--every", type=int, help="N for goodput (default: checkpoint.every_steps of the config)")
    p.add_argument("--scratch", type=Path, help="parent dir for the temp workdir (default: the system temp dir)")
    p.add_argument("--thread-cpu", action="store_true", help="attribute CPU seconds to thread groups (/proc)")
    p.add_argument("--no-plain", action="store_true",
                   help="skip the control windows beside a plain write of the same bytes (plain_write)")
    p.add_argument("--direct", action="store_true", help="also compare trainer.train() with saves vs without")
    p.add_argument("--direct-steps", type=int, help="steps per train() run (default: N + 2*log_every)")
    p.add_argument("--direct-rounds", type=int, default=1, help="(off, on) pairs, ABBA order")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (applied last)")
    return p.parse_args(argv)


def data_overrides(data_path: str) -> list[str]:
    return [f"data.path={data_path}"] if data_path else []


# -- threads: save-completion stamps, per-thread CPU -----------------------------------------------

def thread_table() -> dict[int, tuple[str, float]]:
    """tid -> (comm, CPU seconds) for every thread of this process, from /proc/self/task/*/stat."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                head, _, tail = f.read().rpartition(b")")
        except OSError:
            continue  # the thread just ended
        fields = tail.split()
        comm = head.split(b"(", 1)[1].decode(errors="replace")
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def thread_group(tid: int, comm: str, names: dict[int, str]) -> str:
    """Who a thread works for: XLA, the save (TensorStore/Orbax/manifest), data, or the loop."""
    name = names.get(tid, "")
    if tid == os.getpid():
        return "main thread (dispatch, data, poll)"
    if comm.startswith(("tf_", "llvm")):
        return "XLA (tf_*, llvm-*)"
    if comm.startswith("ts_"):
        return "TensorStore (ts_*)"
    if name.startswith("grain"):
        return "Grain prefetch"
    if name == Watcher.NAME:
        return "watcher (this benchmark)"
    if not name:
        return "native threads (not Python's)"
    return "other Python threads (Orbax, manifest)"


class Watcher(threading.Thread):
    """Stamps Orbax commit and manifest completion; optionally samples per-thread CPU."""

    NAME = "train-save-watcher"

    def __init__(self, ckpt: Checkpointer, sample_cpu: bool):
        super().__init__(name=self.NAME, daemon=True)
        self.ckpt, self.sample_cpu = ckpt, sample_cpu
        self.lock, self.stop_event = threading.Lock(), threading.Event()
        self.t0: float | None = None
        self.commit: float | None = None
        self.manifest: float | None = None
        self.base: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}

    def arm(self, t0: float) -> None:
        """Start stamping the save that started at ``t0`` (perf_counter)."""
        with self.lock:
            self.t0, self.commit, self.manifest = t0, None, None

    def disarm(self) -> tuple[float | None, float | None]:
        with self.lock:
            self.t0 = None
            return self.commit, self.manifest

    def _stamp(self) -> None:
        with self.lock:
            if self.t0 is None:
                return
            now = time.perf_counter() - self.t0
            # Orbax's save call may still be starting on jaxckpt's SaveStart thread: not committed before it returns
            start = getattr(getattr(self.ckpt, "_pending", None), "start", None)
            if self.commit is None and (start is None or start.done()) and \
                    not self.ckpt.manager.is_saving_in_progress():
                self.commit = now
            finalizer = getattr(getattr(self.ckpt, "_pending", None), "finalizer", None)
            # ident is None until the thread runs: a created-but-not-started finalizer is not "done"
            if self.manifest is None and getattr(finalizer, "ident", None) is not None and not finalizer.is_alive():
                self.manifest = now

    def begin_window(self) -> None:
        with self.lock:
            self.last = self._sample() if self.sample_cpu else {}
            self.base = {tid: cpu for tid, (_, cpu) in self.last.items()}

    def end_window(self) -> dict[str, float]:
        """CPU seconds per thread group since ``begin_window`` (threads that ended: up to their last sample)."""
        with self.lock:
            if not self.sample_cpu:
                return {}
            self.last.update(self._sample())
            out: dict[str, float] = {}
            for tid, (group, cpu) in self.last.items():
                out[group] = out.get(group, 0.0) + cpu - self.base.get(tid, 0.0)
            return out

    def _sample(self) -> dict[int, tuple[str, float]]:
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        return {tid: (thread_group(tid, comm, names), cpu) for tid, (comm, cpu) in thread_table().items()}

    def run(self) -> None:
        last_sample = time.perf_counter()
        while not self.stop_event.wait(TICK_S):
            self._stamp()
            if self.sample_cpu and time.perf_counter() - last_sample >= SAMPLE_S:
                last_sample = time.perf_counter()
                with self.lock:
                    self.last.update(self._sample())


# -- the measurement --------------------------------------------------------------------------------

@dataclass
class Step:
    wall: float
    cpu: float
    faults: int = 0  # minor page faults in the process during the step (memory touched for the first time)


@dataclass
class SaveWindow:
    step: int
    blocking: float
    blocking_cpu: float
    steps: list[Step]
    durable: float  # the Checkpointer's own figure: save() -> complete (noticed by poll/wait)
    commit: float | None  # watcher: Orbax finished writing + committed
    manifest: float | None  # watcher: CRC32 manifest thread ended
    wait: float = 0.0
    wait_cpu: float = 0.0
    local_t0: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)


@dataclass
class Normal:
    steps: list[Step]
    threads: dict[str, float] = field(default_factory=dict)


def plain_write(arrays: list[Any], path: Path, pacer: Any, nice: int, idle: bool) -> None:
    """The control for a save beside training: the same bytes into one file at the save's pace (``pacer``'s
    rate and period; None: at once) and priority (nice value, SCHED_IDLE), then ``fdatasync``. No serialization,
    checksums, metadata or Python beyond the loop: what writing the state at all costs the steps beside it."""
    lower_this_thread(nice, idle)
    burst = int(pacer.burst) if pacer else 1 << 62
    opens, used = time.monotonic() + (pacer.period if pacer else 0.0), 0  # the first window opens as a save's
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for a in arrays:
            buf, off = a.reshape(-1).view("uint8"), 0
            while off < buf.size:
                if used >= burst:
                    opens, used = opens + pacer.period, 0
                time.sleep(max(0.0, opens - time.monotonic()))
                n = os.write(fd, buf[off:off + min(burst - used, 4 << 20)])
                off, used = off + n, used + n
        os.fdatasync(fd)
    finally:
        os.close(fd)


class Bench:
    """The trainer's step, data and Checkpointer, driven one timed step at a time."""

    def __init__(self, cfg: Config, workdir: Path, args: argparse.Namespace):
        self.cfg, self.events = cfg, []
        self.run = Run.build(cfg, workdir)
        self.state = create_state(self.run.mdef, self.run.tx, self.run.mesh, cfg.train.seed)
        self.n_params = param_count(self.state["params"])
        self.state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.state))
        self.it = self.run.data.train_iterator(0)
        self.step, self.metrics = 0, None
        self.ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, on_event=self._on_event)
        self.watcher = Watcher(self.ckpt, args.thread_cpu)
        self.watcher.start()

    def _on_event(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, **fields})

    def _completed(self, step: int) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "checkpoint" and e.get("step") == step), None)

    def one_step(self, first: bool = False) -> Step:
        """One step, waited for; ``first``: as the trainer runs its first (``trainer.first_step``)."""
        w, c, f = time.perf_counter(), time.process_time(), minor_faults()
        batch = self.run.data.to_global(next(self.it))
        if first:
            self.state, self.metrics = trainer_lib.first_step(self.run.step_fn, self.state, batch)
        else:
            self.state, self.metrics = self.run.step_fn(self.state, batch)
        jax.block_until_ready((self.state, self.metrics))
        self.step += 1
        self.ckpt.poll()
        return Step(time.perf_counter() - w, time.process_time() - c, minor_faults() - f)

    def normal(self, n: int) -> Normal:
        self.watcher.begin_window()
        steps = [self.one_step() for _ in range(n)]
        return Normal(steps, self.watcher.end_window())

    def start_save(self, paced: bool) -> tuple[int, float, float]:
        """``trainer.save`` at the current step (metrics as the trainer's last log row); (step, wall, CPU)."""
        self.run.last_metrics = {k: float(v) for k, v in jax.device_get(self.metrics).items()}
        start = resume_lib.Start(self.state, self.step, self.it, 0)
        w, c = time.perf_counter(), time.process_time()
        trainer_lib.save(self.run, self.ckpt, self.step, self.state, start, paced=paced)
        self.watcher.arm(w)
        return self.step, time.perf_counter() - w, time.process_time() - c

    def save_window(self, max_steps: int, train_beside: bool = True) -> SaveWindow:
        """Save, then step until the save is complete (or ``max_steps`` steps, then ``wait()``)."""
        self.watcher.begin_window()
        step, blocking, blocking_cpu = self.start_save(paced=train_beside)
        steps: list[Step] = []
        while train_beside and len(steps) < max_steps and self._completed(step) is None and self.ckpt_pending():
            steps.append(self.one_step())
        w, c = time.perf_counter(), time.process_time()
        self.ckpt.wait()
        wait, wait_cpu = time.perf_counter() - w, time.process_time() - c
        commit, manifest = self.watcher.disarm()
        event = self._completed(step) or {"durable": self.ckpt.last_durable_s}
        win = SaveWindow(step, blocking, blocking_cpu, steps, event["durable"], commit, manifest, wait, wait_cpu)
        win.threads = self.watcher.end_window()
        return win

    def plain_window(self, max_steps: int) -> Normal:
        """Steps beside :func:`plain_write` of the state, which holds zero-copy views of it as a save's snapshot
        does (so these steps cannot donate it either), until the write is durable or ``max_steps``."""
        views = [np.ascontiguousarray(s.data) for x in jax.tree_util.tree_leaves(self.state)
                 for s in x.addressable_shards]
        path = self.ckpt.directory.parent / "plain.bin"
        writer = threading.Thread(target=plain_write, daemon=True, args=(
            views, path, self.ckpt.pacer_for(paced=True), self.cfg.checkpoint.save_nice, self.cfg.checkpoint.save_idle))
        del views
        self.watcher.begin_window()
        writer.start()
        steps = []
        while writer.is_alive() and len(steps) < max_steps:
            steps.append(self.one_step())
        writer.join()
        path.unlink(missing_ok=True)
        return Normal(steps, self.watcher.end_window())

    def ckpt_pending(self) -> bool:
        return getattr(self.ckpt, "_pending", True) is not None

    def close(self) -> None:
        self.watcher.stop_event.set()
        self.watcher.join()
        self.ckpt.close()
        getattr(self.it, "close", lambda: None)()


@dataclass
class Measured:
    compile_s: float
    alone: SaveWindow
    normals: list[Normal]
    saves: list[SaveWindow]
    plains: list[Normal] = field(default_factory=list)  # steps beside plain_write (the control)


def measure(bench: Bench, args: argparse.Namespace, every: int) -> Measured:
    """Compile + warm up, one save alone, then normal / save windows interleaved."""
    compile_s = bench.one_step(first=True).wall
    for _ in range(args.warmup):
        bench.one_step()
    alone = bench.save_window(0, train_beside=False)
    say(f"compiled in {compile_s:.1f}s; save alone: blocking {alone.blocking:.3f}s, durable {alone.durable:.2f}s")
    normals, saves, plains, before = [bench.normal(args.normal_steps)], [], [], []
    for r in range(args.reps):
        before.append(len(normals) - 1)
        saves.append(bench.save_window(every))
        normals.append(bench.normal(args.normal_steps))
        s = saves[-1]
        say(f"save {r + 1}/{args.reps}: blocking {s.blocking:.3f}s, {len(s.steps)} steps overlapped "
            f"({steps_text(s.steps)} s), durable {s.durable:.2f}s; normal steps {steps_text(normals[-1].steps)} s")
        if not args.no_plain:
            plains.append(bench.plain_window(every))
            normals.append(bench.normal(args.normal_steps))
            say(f"plain write {r + 1}/{args.reps}: steps beside it {steps_text(plains[-1].steps)} s; "
                f"normal steps {steps_text(normals[-1].steps)} s")
    for i, s in zip(before, saves, strict=True):
        s.local_t0 = statistics.median(x.wall for n in normals[i:i + 2] for x in n.steps)
    return Measured(compile_s, alone, normals, saves, plains)


def steps_text(steps: list[Step]) -> str:
    return ", ".join(f"{x.wall:.2f}" for x in steps)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- analysis -----------------------------------------------------------------------------------------

def save_extra(s: SaveWindow, t0: float) -> float:
    return s.blocking + sum(x.wall - t0 for x in s.steps) + s.wait


def save_cpu(s: SaveWindow, c0: float) -> float:
    return s.blocking_cpu + sum(x.cpu - c0 for x in s.steps) + s.wait_cpu


def places(m: Measured) -> dict[str, list[Step]]:
    """Overlapped steps by their place in the save window: the first carries what Orbax sets up for all arrays
    and the step that cannot donate the state the save still reads; later ones the paced writes."""
    return {"1st": [x for s in m.saves for x in s.steps[:1]], "2nd": [x for s in m.saves for x in s.steps[1:2]],
            "3rd and later": [x for s in m.saves for x in s.steps[2:]]}


def typical_max(walls: list[float], k: int) -> float:
    """The slowest of ``k`` of these steps drawn at random, in the median draw: the slowest step a window of ``k``
    steps shows on this machine with nothing beside it. Exact: the k drawn all lie among the j fastest with
    probability C(j, k) / C(n, k)."""
    ranked, k = sorted(walls), min(k, len(walls))
    draws = math.comb(len(ranked), k)
    return next(ranked[j - 1] for j in range(k, len(ranked) + 1) if 2 * math.comb(j, k) >= draws)


def summarize(m: Measured, every: int) -> dict[str, Any]:
    normal = [x for n in m.normals for x in n.steps]
    over = [x for s in m.saves for x in s.steps]
    plain = [x for p in m.plains for x in p.steps]
    t0 = statistics.median(x.wall for x in normal)
    c0 = statistics.median(x.cpu for x in normal)
    extras = [save_extra(s, t0) for s in m.saves]
    extra = statistics.fmean(extras) if extras else 0.0
    out = {
        "t0": t0, "c0": c0, "n_normal": len(normal), "n_over": len(over), "every": every,
        "normal_min": min(x.wall for x in normal), "normal_max": max(x.wall for x in normal),
        "mean_ratio": statistics.fmean(x.wall for x in over) / t0 if over else float("nan"),
        "max_ratio": max(x.wall for x in over) / t0 if over else float("nan"),
        # the max's reference on this machine: the slowest of as many normal steps
        "normal_typical_max": typical_max([x.wall for x in normal], len(over)) if over else float("nan"),
        "worst_place": max(((name, statistics.fmean(x.wall for x in xs) / t0, len(xs))
                            for name, xs in places(m).items() if xs), key=lambda p: p[1], default=None),
        # the max's control: how often steps cross the target with and without a save beside them
        "over_slow": sum(x.wall > SLOWDOWN_TARGET * t0 for x in over),
        "normal_slow": sum(x.wall > SLOWDOWN_TARGET * t0 for x in normal),
        "n_plain": len(plain), "plain_slow": sum(x.wall > SLOWDOWN_TARGET * t0 for x in plain),
        "plain_mean_ratio": statistics.fmean(x.wall for x in plain) / t0 if plain else float("nan"),
        "plain_max_ratio": max(x.wall for x in plain) / t0 if plain else float("nan"),
        "extra": extra, "extras": extras,
        "blocking": statistics.fmean(s.blocking for s in m.saves),
        "overlap_extra": statistics.fmean(sum(x.wall - t0 for x in s.steps) for s in m.saves),
        "wait": statistics.fmean(s.wait for s in m.saves),
        "save_cpu": statistics.fmean(save_cpu(s, c0) for s in m.saves),
        "goodput": every * t0 / (every * t0 + extra),
        # step-to-step noise alone puts this much spread on one save's sum over its overlapped steps
        "overlap_noise": statistics.stdev(x.wall for x in normal) * (len(over) / len(m.saves)) ** 0.5
        if len(normal) > 1 and m.saves else float("nan"),
    }
    out["cpu_goodput"] = every * c0 / (every * c0 + out["save_cpu"])
    return out


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def share(k: int, n: int) -> str:
    return f"{k} of {n} ({k / n:.0%})" if n else "-"


def control_rows(sm: dict[str, Any]) -> list[str]:
    """What the machine does to steps without jaxckpt's save: the same bytes written plainly, and no write."""
    rows = []
    if sm["n_plain"]:
        rows.append(f"| control: steps beside a plain write of the same bytes at the same pace and priority "
                    f"({sm['n_plain']} steps), mean / max ÷ T0 | {sm['plain_mean_ratio']:.2f}× / "
                    f"{sm['plain_max_ratio']:.2f}× | - | |")
    plain = f" / {share(sm['plain_slow'], sm['n_plain'])}" if sm["n_plain"] else ""
    rows.append(f"| control: steps over {SLOWDOWN_TARGET}× T0, beside a save{' / plain write' if plain else ''} / "
                f"none (normal) | {share(sm['over_slow'], sm['n_over'])}{plain} / "
                f"{share(sm['normal_slow'], sm['n_normal'])} (normal max {sm['normal_max'] / sm['t0']:.2f}×) | - | |")
    return rows


def slowest_rows(sm: dict[str, Any]) -> list[str]:
    """The slowest steps beside a save against their normal time. A step's normal time varies on a shared machine
    (normal steps spanned 30-70 % of their median within a run on the VM of benchmarks/README.md), so the slowest
    of ~45 steps over T0 measures the machine as much as the save: there, as many normal steps often include one
    over 1.2x T0 too. Two verdicts keep the save's part: the slowest place in the save window, on average over
    the saves (a cost each save adds at that place), and the slowest step against the slowest of as many
    normal steps (a tail the saves add). The raw ratio is printed beside them, with the normal steps' own."""
    if sm["worst_place"] is None:
        return ["| slowest overlapped step | no steps overlapped a save | - | |"]
    name, place, saves = sm["worst_place"]
    k, n, t0, target = sm["n_over"], sm["n_normal"], sm["t0"], SLOWDOWN_TARGET
    tail = sm["max_ratio"] * t0 / sm["normal_typical_max"]
    normal = (f"the slowest of {k} normal steps (median draw of {k} of {n})" if k < n
              else f"the slowest of all {n} normal steps")
    return [
        f"| slowest place in the save window ({name} step, {saves} of them), mean ÷ T0 | {place:.2f}× "
        f"| ≤ {target}× | {mark(place <= target)} |",
        f"| slowest overlapped step ÷ {normal} | {tail:.2f}× ({sm['max_ratio']:.2f}× ÷ "
        f"{sm['normal_typical_max'] / t0:.2f}× T0) | ≤ {target}× | {mark(tail <= target)} |",
        f"| slowest overlapped step ÷ T0, raw (the machine's own noise included: normal steps reached "
        f"{sm['normal_max'] / t0:.2f}× T0) | {sm['max_ratio']:.2f}× | - | |",
    ]


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def save_rows(m: Measured, sm: dict[str, Any]) -> list[str]:
    t0, c0 = sm["t0"], sm["c0"]
    lines = [
        "| save | blocking s | steps overlapped | overlapped step s (each) | mean ÷ T0 | max ÷ T0 | mean ÷ local T0 "
        "| Orbax commit s | manifest done s | durable s (logged) | wait s | extra s | save CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in [m.alone, *m.saves]:
        walls = [x.wall for x in s.steps]
        shown = ", ".join(f"{w:.2f}" for w in walls[:8]) + (f", … ({len(walls) - 8} more)" if len(walls) > 8 else "")
        mean = statistics.fmean(walls) if walls else None
        alone = s is m.alone
        lines.append(
            f"| {'alone (first, no steps beside it)' if alone else f'step {s.step}'} | {s.blocking:.3f} | {len(walls)} "
            f"| {shown or '-'} | {fmt(mean and mean / t0)} "
            f"| {fmt(max(walls) / t0 if walls else None)} | {fmt(mean and mean / s.local_t0 if not alone else None)} "
            f"| {fmt(s.commit)} | {fmt(s.manifest)} | {s.durable:.2f} | {s.wait:.2f} "
            f"| {'-' if alone else f'{save_extra(s, t0):.2f}'} | {save_cpu(s, c0):.2f} |"
        )
    return lines


def thread_rows(m: Measured) -> list[str]:
    """CPU seconds per thread group: per normal step vs per save window, and the difference per save."""
    normal_steps = sum(len(n.steps) for n in m.normals)
    groups = sorted({g for w in [*m.normals, *m.saves] for g in w.threads})
    lines = [
        "| thread group | CPU s per normal step | CPU s per save window | steps per save window "
        "| extra CPU s per save (window - steps × normal) |",
        "|---|---|---|---|---|",
    ]
    n_saves, over_steps = len(m.saves), sum(len(s.steps) for s in m.saves)
    for g in groups:
        per_step = sum(n.threads.get(g, 0.0) for n in m.normals) / normal_steps
        per_save = sum(s.threads.get(g, 0.0) for s in m.saves) / n_saves
        extra = per_save - per_step * over_steps / n_saves
        lines.append(f"| {g} | {per_step:.3f} | {per_save:.3f} | {over_steps / n_saves:.1f} | {extra:+.3f} |")
    alone = ", ".join(f"{g} {c:.2f}" for g, c in sorted(m.alone.threads.items()) if c >= 0.005)
    lines.append(f"save alone (no training beside it), CPU s by group: {alone}")
    return lines


def position_line(m: Measured, t0: float) -> str:
    """Overlapped steps by their place in the save window (:func:`places`), mean and max."""
    cells = [f"{name} {statistics.fmean(x.wall for x in xs) / t0:.2f}× / {max(x.wall for x in xs) / t0:.2f}× "
             f"({len(xs)})" for name, xs in places(m).items() if xs]
    return f"overlapped steps by place in the save window, mean / max ÷ T0 (count): {'; '.join(cells)}"


def local_line(m: Measured) -> str:
    """Overlapped steps against their own save's local T0: the machine's speed drifts over a run (normal steps
    ranged 0.93-1.61 s in one run of benchmarks/README.md §2, twentieth session), and a slow stretch puts a whole
    save window over the run's median."""
    ratios = [x.wall / s.local_t0 for s in m.saves for x in s.steps if s.local_t0]
    if not ratios:
        return "overlapped steps ÷ local T0: -"
    return (f"overlapped steps ÷ their save's local T0 (median of the normal windows before and after): "
            f"mean {statistics.fmean(ratios):.2f}×, max {max(ratios):.2f}× ({sum(r > SLOWDOWN_TARGET for r in ratios)} "
            f"of {len(ratios)} over {SLOWDOWN_TARGET}×)")


def faults_line(m: Measured, t0: float) -> str:
    """Minor page faults per step: memory touched for the first time (fresh temporaries, a heap that grew).
    126,000 of them made a step 0.18-0.67 s longer on the VMs of benchmarks/README.md (§2, nineteenth session)."""
    kinds = {"normal": [x for n in m.normals for x in n.steps], "overlapped": [x for s in m.saves for x in s.steps]}
    cells = [f"{k} median {statistics.median(x.faults for x in v):,.0f}, max {max(x.faults for x in v):,}"
             for k, v in kinds.items() if v]
    worst = max((x for v in kinds.values() for x in v), key=lambda x: x.faults, default=None)
    tail = f" (that step: {worst.wall / t0:.2f}× T0)" if worst is not None else ""
    return f"minor page faults per step: {'; '.join(cells)}{tail}"


def goodput_lines(sm: dict[str, Any]) -> list[str]:
    n, t0 = sm["every"], sm["t0"]
    return [
        f"goodput with a save every N={n} steps = N·T0 / (N·T0 + extra)",
        f"  T0 = {t0:.3f} s (median of {sm['n_normal']} normal steps; range {sm['normal_min']:.2f}-"
        f"{sm['normal_max']:.2f} s), N·T0 = {n * t0:.1f} s",
        f"  extra = blocking {sm['blocking']:.3f} s + Σ(overlapped step − T0) {sm['overlap_extra']:+.3f} s "
        f"+ wait {sm['wait']:.3f} s = {sm['extra']:.3f} s (mean over {len(sm['extras'])} saves; each: "
        f"{', '.join(f'{e:.2f}' for e in sm['extras'])})",
        f"  goodput = {n * t0:.1f} / ({n * t0:.1f} + {sm['extra']:.3f}) = {sm['goodput']:.2%}",
        f"  (step-to-step noise alone gives one save's Σ a spread of ±{sm['overlap_noise']:.2f} s: stdev of normal "
        f"steps × √(overlapped steps per save); a negative Σ means the overlap cost is below that noise)",
        f"same in CPU time: N·C0 / (N·C0 + save CPU) = {n * sm['c0']:.1f} / ({n * sm['c0']:.1f} + "
        f"{sm['save_cpu']:.3f}) = {sm['cpu_goodput']:.2%} (C0 = median normal-step process CPU; the share of the "
        f"machine the save takes from training when the cores are saturated)",
    ]


def machine() -> str:
    return (f"{platform.system()} {platform.release()}, {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
            f"usable CPUs {len(os.sched_getaffinity(0))}, jax {jax.__version__} on {jax.devices()[0].platform}; "
            f"{malloc.describe()}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command(argv: list[str]) -> str:
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    return shlex.join([exe, "benchmarks/train_save.py", *argv])


def pace(bench: Bench) -> str:
    pacer = bench.ckpt.pacer_for(paced=True)
    return f"{pacer.rate / 1e6:g} MB/s in windows every {pacer.period:g} s" if pacer else "none (writes at once)"


def header(cfg: Config, args: argparse.Namespace, bench: Bench, argv: list[str], load0: str) -> list[str]:
    mc = cfg.model
    return [
        f"command: {command(argv)}",
        f"machine: {machine()}; load average at start {load0}, at end {load()}",
        f"config: {args.config} + {' '.join(args.overrides) or 'no overrides'}; d_model={mc.d_model} "
        f"n_layers={mc.n_layers} n_heads={mc.n_heads} d_ff={mc.d_ff} seq_len={mc.seq_len} "
        f"batch={cfg.data.batch_size} ({bench.run.tokens_per_step():,} tokens/step); {bench.n_params:,} params; "
        f"train state {bench.state_bytes / 1e6:.1f} MB; data {bench.run.data.path}",
        f"checkpoint: every_steps={cfg.checkpoint.every_steps} (N={args.every}), async_save="
        f"{cfg.checkpoint.async_save}, keep_latest={cfg.checkpoint.keep_latest}; dir {bench.ckpt.directory}; "
        f"save threads: nice {cfg.checkpoint.save_nice}, SCHED_IDLE {cfg.checkpoint.save_idle}; "
        f"write pace beside training: {pace(bench)}",
        f"windows: {args.reps} saves, {args.normal_steps} steps per normal window, {args.reps + 1} normal windows, "
        f"interleaved; each step = next batch + to_global + step_fn + block_until_ready + Checkpointer.poll()",
    ]


def report(cfg: Config, args: argparse.Namespace, bench: Bench, m: Measured, argv: list[str], load0: str) -> str:
    sm = summarize(m, args.every)
    mean_ok = sm["mean_ratio"] <= SLOWDOWN_TARGET
    noise = (sm["normal_max"] - sm["normal_min"]) / sm["t0"]
    lines = [
        *header(cfg, args, bench, argv, load0), "",
        f"T0 = median normal step {sm['t0']:.3f} s wall, {sm['c0']:.3f} s process CPU "
        f"({sm['c0'] / sm['t0']:.2f} cores busy); normal steps range {sm['normal_min']:.2f}-{sm['normal_max']:.2f} s "
        f"({noise:.0%} of T0: this machine's step-to-step noise); compile + first step {m.compile_s:.1f} s", "",
        *save_rows(m, sm), "",
        "| question | measured | target | |",
        "|---|---|---|---|",
        f"| mean overlapped step ÷ T0 ({sm['n_over']} steps) | {sm['mean_ratio']:.2f}× | ≤ {SLOWDOWN_TARGET}× "
        f"| {mark(mean_ok)} |",
        *slowest_rows(sm),
        *control_rows(sm),
        f"| goodput, save every {args.every} steps (from pieces) | {sm['goodput']:.2%} | ≥ {GOODPUT_TARGET:.0%} "
        f"| {mark(sm['goodput'] >= GOODPUT_TARGET)} |",
        f"| save CPU per save (blocking + overlapped excess + wait) | {sm['save_cpu']:.2f} s "
        f"(alone: {save_cpu(m.alone, sm['c0']):.2f} s) | - | |", "",
        position_line(m, sm["t0"]), local_line(m), faults_line(m, sm["t0"]), "",
        *goodput_lines(sm),
    ]
    if args.thread_cpu:
        lines += ["", *thread_rows(m)]
    return "\n".join(lines)


# -- --direct: trainer.train() with and without checkpointing --------------------------------------

@dataclass
class DirectRun:
    checkpoint: bool
    steps: int  # steps between the first and the last metrics.jsonl row
    wall: float  # seconds between them (the rows' time column)
    saves: list[dict[str, Any]]  # checkpoint events of saves started inside that window


def direct_config(args: argparse.Namespace, data_path: str, steps: int, on: bool) -> Config:
    base = ["train.eval_every=0", "train.progress=false", f"train.steps={steps}",
            f"checkpoint.every_steps={args.every}"]
    return load_config(args.config, data_overrides(data_path) + base + list(args.overrides)
                       + [f"checkpoint.enabled={str(on).lower()}"])


def direct_run(cfg: Config, workdir: Path) -> DirectRun:
    trainer_lib.train(cfg, workdir)
    rows = read_jsonl(workdir / "metrics.jsonl")
    r0, r1 = rows[0], rows[-1]
    saves = [e for e in read_jsonl(workdir / "events.jsonl")
             if e["event"] == "checkpoint" and r0["step"] <= e["step"] < r1["step"]]
    return DirectRun(cfg.checkpoint.enabled, r1["step"] - r0["step"], r1["time"] - r0["time"], saves)


def direct(args: argparse.Namespace, data_path: str, tmp: Path) -> list[tuple[DirectRun, DirectRun]]:
    """(off, on) per round; rounds alternate which runs first (ABBA)."""
    cfg0 = load_config(args.config, data_overrides(data_path) + list(args.overrides))
    steps = args.direct_steps or args.every + 2 * cfg0.train.log_every
    out = []
    for r in range(args.direct_rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        runs = {}
        for on in order:
            runs[on] = direct_run(direct_config(args, data_path, steps, on), tmp / f"direct{r}-{'on' if on else 'off'}")
            d = runs[on]
            say(f"direct round {r + 1}: checkpoint {'on ' if on else 'off'}: {d.steps} steps in {d.wall:.1f}s, "
                f"{len(d.saves)} saves in the window")
        out.append((runs[False], runs[True]))
    return out


def direct_lines(pairs: list[tuple[DirectRun, DirectRun]], every: int) -> list[str]:
    lines = [
        "| round | checkpointing | timed steps | wall s | s/step | saves in window (blocking s / durable s) |",
        "|---|---|---|---|---|---|",
    ]
    goodputs = []
    for i, (off, on) in enumerate(pairs):
        for d in (off, on):
            saves = ", ".join(f"step {e['step']}: {e.get('blocking', 0):.3f} / {e.get('durable', 0):.2f}"
                              for e in d.saves) or "-"
            lines.append(f"| {i + 1} | {'on, every ' + str(every) if d.checkpoint else 'off'} | {d.steps} "
                         f"| {d.wall:.1f} | {d.wall / d.steps:.3f} | {saves} |")
        t_off = off.wall / off.steps
        extra = (on.wall / on.steps - t_off) * on.steps / max(len(on.saves), 1)
        goodputs.append(every * t_off / (every * t_off + extra))
        lines.append(f"round {i + 1}: window ratio off/on = {(off.wall / off.steps) / (on.wall / on.steps):.2%}; "
                     f"extra per save = {extra:+.2f} s; goodput at N={every} = {every:.0f}·{t_off:.3f} / "
                     f"({every:.0f}·{t_off:.3f} + {extra:.2f}) = {goodputs[-1]:.2%}")
    g = statistics.median(goodputs)
    lines.append(f"direct goodput (median of rounds) {g:.2%}: target ≥ {GOODPUT_TARGET:.0%}: "
                 f"{mark(g >= GOODPUT_TARGET)} "
                 "(whole train() runs: run-to-run load noise is of the same size as the effect; the "
                 "from-pieces figure above is the steadier one)")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load0, t_start = load(), time.perf_counter()
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxckpt-bench-train-save-", dir=args.scratch) as tmp_s:
        tmp = Path(tmp_s)
        data_path = benchlib.dataset(tmp)
        cfg = load_config(args.config, data_overrides(data_path) + list(args.overrides))
        args.every = args.every or cfg.checkpoint.every_steps
        if args.every <= 0:
            raise SystemExit("checkpoint.every_steps is 0 in this config: pass --every N")
        trainer_lib.enable_compilation_cache(cfg.train.compilation_cache)  # as train() does
        bench = Bench(cfg, tmp / "bench", args)
        try:
            m = measure(bench, args, args.every)
        finally:
            bench.close()
        text = report(cfg, args, bench, m, argv, load0)
        pairs = direct(args, data_path, tmp) if args.direct else []
    if pairs:
        text += "\n\ntrainer.train() with checkpointing on vs off (--direct)\n\n"
        text += "\n".join(direct_lines(pairs, args.every))
    print(text + f"\n\nbenchmark wall time {time.perf_counter() - t_start:.0f} s; load average at end {load()}")
    if args.json:
        raw = {"config": cfg.to_dict(), "measured": asdict(m), "summary": summarize(m, args.every),
               "direct": [[asdict(d) for d in p] for p in pairs]}
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    malloc.reexec()  # measure on the allocator the jaxckpt command trains on (jaxckpt/malloc.py)
    sys.exit(main())
