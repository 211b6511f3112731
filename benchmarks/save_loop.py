"""Saves in a row through jaxckpt's Checkpointer, as a training run makes them: when retention's files go.

    python benchmarks/save_loop.py                       # 1 GB state, 6 saves per mode, 5 s apart (~2 min)
    python benchmarks/save_loop.py --gb 0.13 --saves 8   # the size of configs/small.py's state
    python benchmarks/save_loop.py --devices 8           # state sharded over 8 fake CPU devices

With ``checkpoint.keep_latest=1`` every save after the first drops the one before it. Two Checkpointers on two
directories take turns, save by save, with the same state (``benchmarks/checkpoint.py``'s), in one process:

- *as shipped*: retention moves the dropped step to ``checkpoints/.deleted`` and the next save removes its
  files just before it writes (``jaxckpt.checkpoint.TODELETE``);
- *delete at once*: the files are removed inside retention itself, as Orbax's ``max_to_keep`` does (and
  jaxckpt did before).

Before each save the process sleeps ``--gap`` seconds, as a run trains between saves (on a VM that hands free
memory back to its host, memory freed more than ~2 s earlier has to be backed again when touched). A save is
``Checkpointer.save`` and then ``Checkpointer.wait``, which completes it as at a preemption or the end of a run
(Orbax's commit, the CRC32 manifest, retention). Timed per save: *blocking* (``save``), *durable* (the
Checkpointer's ``last_durable_s``, from ``save`` to the manifest), *CPU* (process CPU seconds from ``save`` until
``wait`` returns: the save's own work plus one dropped step's deletion, in either mode) and *retention* (wall
seconds in ``apply_retention``, which a training loop runs on its own thread from ``poll()``). Medians over
saves 3..N of each mode, the ones that remove an earlier step's files.
"""

# ruff: noqa: E402, I001
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint as bench  # first: it reads --devices from sys.argv and sets XLA_FLAGS before jax loads
import benchlib

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import jax

from jaxckpt.checkpoint import Checkpointer
from jaxckpt.config import CheckpointConfig


class DeleteAtOnce(Checkpointer):
    """The dropped steps' files removed inside retention (Orbax's ``max_to_keep`` timing)."""

    def apply_retention(self) -> list[int]:
        dropped = super().apply_retention()
        self._purge_deleted()
        return dropped


MODES: dict[str, type[Checkpointer]] = {"as shipped": Checkpointer, "delete at once": DeleteAtOnce}
FIELDS = ("blocking", "durable", "cpu", "retention")


class NoData:
    """A data iterator with nothing to restore (the state is what is timed)."""

    def get_state(self) -> bytes:
        return b"{}"


def run(args: argparse.Namespace, root: Path, state: Any) -> dict[str, list[dict[str, float]]]:
    """Every save of every mode, taking turns; one dict of timings per save."""
    cfg = CheckpointConfig(keep_latest=1, async_save=True)
    ckpts = {name: cls(root / name.replace(" ", "-"), cfg) for name, cls in MODES.items()}
    spent: dict[str, list[float]] = {name: [] for name in MODES}
    for name, ckpt in ckpts.items():  # the instance attribute is what _complete() calls
        ckpt.apply_retention = benchlib.timed(ckpt.apply_retention, spent[name])  # type: ignore[method-assign]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in MODES}
    try:
        for step in range(1, args.saves + 1):
            for name, ckpt in ckpts.items():
                time.sleep(args.gap)
                before = len(spent[name])
                c0, t0 = time.process_time(), time.perf_counter()
                blocking = ckpt.save(step, state, NoData(), {"metrics": {}})
                ckpt.wait()
                rows[name].append({"blocking": blocking, "durable": ckpt.last_durable_s,
                                   "cpu": time.process_time() - c0, "retention": sum(spent[name][before:]),
                                   "wall": time.perf_counter() - t0})
                print(f"[save_loop] {name}: save {step}: " + ", ".join(f"{k} {v:.3f}s" for k, v in
                                                                        rows[name][-1].items()), flush=True)
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    return rows


def report(args: argparse.Namespace, nbytes: int, rows: dict[str, list[dict[str, float]]]) -> str:
    gb = nbytes / 1e9
    med = {name: {k: statistics.median(r[k] for r in rs[2:]) for k in FIELDS} for name, rs in rows.items()}
    lines = [f"state: {gb:.3f} GB ({len(jax.devices())} device(s)); {args.saves} saves per mode, {args.gap:g} s "
             f"apart, keep_latest=1; medians over saves 3..{args.saves}",
             f"machine: {os.cpu_count()} CPUs, load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             "| mode | blocking s | durable s | GB/s | CPU s per save | retention s (train loop's thread) |",
             "|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['blocking']:.3f} | {m['durable']:.2f} | {gb / m['durable']:.2f} | "
                     f"{m['cpu']:.2f} | {m['retention']:.3f} |")
    lines.append("every save, durable s: " + "; ".join(
        f"{name} {' '.join(f'{r['durable']:.2f}' for r in rs)}" for name, rs in rows.items()))
    shipped, at_once = med["as shipped"], med["delete at once"]
    lines.append(f"as shipped / delete at once: durable {shipped['durable'] / at_once['durable']:.2f}×, "
                 f"CPU {shipped['cpu'] / at_once['cpu']:.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="state size in GB (default 1.0)")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices to shard the state over")
    p.add_argument("--saves", type=int, default=6, help="saves per mode (at least 3; default 6)")
    p.add_argument("--gap", type=float, default=5.0, help="seconds between saves (default 5)")
    p.add_argument("--dir", type=Path, default=None, help="parent of the scratch dir (default: the repo's parent)")
    args = p.parse_args(argv)
    if args.saves < 3:
        p.error("--saves must be at least 3: saves 1 and 2 have no dropped step's files to remove")
    root = Path(tempfile.mkdtemp(prefix="jaxckpt-bench-loop-", dir=args.dir or Path(__file__).resolve().parents[2]))
    try:
        state = bench.build_state(args.gb)
        nbytes = bench.tree_bytes(state)
        print(report(args, nbytes, run(args, root, state)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
