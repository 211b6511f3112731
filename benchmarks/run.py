"""Run jaxckpt's benchmark scripts one after another, each in its own subprocess.

    python -m benchmarks.run                          # all of them, full size (~25-40 min on 2 busy cores)
    python -m benchmarks.run --quick --out bench.md   # cheaper flags for each; also tee everything to bench.md
    python -m benchmarks.run --only restart,step
    python -m benchmarks.run --list
    jaxckpt bench --quick                             # the same, from the CLI (source checkout only)

Each script runs as ``python benchmarks/NAME.py [quick flags]`` with this interpreter, from the repo root,
with ``PYTHONUNBUFFERED=1`` and its stderr merged into its stdout, so its progress lines and its tables
appear in the order it wrote them. Its output is printed under a header showing the exact command, followed
by its exit status and wall time; a summary at the end names the scripts that failed (a non-zero exit or a
missing file). A script's own PASS/FAIL verdicts against its targets are part of its output, not failures.
Nothing is timed here beyond each script's wall time: the numbers are the scripts' own.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Benchmark:
    script: str  # relative to the repo root
    about: str
    quick: tuple[str, ...] = ()  # flags for --quick


BENCHMARKS: dict[str, Benchmark] = {
    "step": Benchmark("benchmarks/step.py", "trainer throughput vs a bare loop over the same jitted step",
                      ("--rounds", "2", "--steps", "10")),
    "checkpoint": Benchmark("benchmarks/checkpoint.py",
                            "checkpoint save/restore of a ~1 GB train state vs stock Orbax, np.save and dd",
                            ("--gb", "0.25", "--reps", "1")),
    "train_save": Benchmark("benchmarks/train_save.py", "training while an async save is in flight: slowdown, goodput",
                            ("--reps", "2", "--normal-steps", "3", "model.n_layers=2", "data.batch_size=8")),
    "restart": Benchmark("benchmarks/restart.py",
                         "restart latency (process start -> first step after resume), cold vs warm compile cache",
                         ("--reps", "1")),
    "mfu": Benchmark("benchmarks/mfu.py", "model FLOPs utilisation of the 125M/1B train step (accelerator only)",
                     ("--steps", "5", "--repeats", "1")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated subset, run in the order given (of: {', '.join(BENCHMARKS)})")
    p.add_argument("--quick", action="store_true", help="cheaper flags for each script (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--out", type=Path, help="also write everything printed to this markdown file")
    args = p.parse_args(argv)
    args.names = list(BENCHMARKS)
    if args.only is not None:
        args.names = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        unknown = [n for n in args.names if n not in BENCHMARKS]
        if unknown or not args.names:
            p.error(f"--only: unknown benchmark(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                    f"known: {', '.join(BENCHMARKS)}")
    return args


def list_text() -> str:
    lines = []
    for name, b in BENCHMARKS.items():
        missing = "" if (REPO / b.script).is_file() else "  (file missing)"
        lines.append(f"{name:<11} {b.script}{missing}\n{'':<11} {b.about}\n{'':<11} --quick: {shlex.join(b.quick)}")
    return "\n".join(lines)


def command(b: Benchmark, quick: bool) -> list[str]:
    return [sys.executable, b.script, *(b.quick if quick else ())]


class Tee:
    """Writes to stdout and, if given, a file (both flushed per write, so a long run can be followed)."""

    def __init__(self, path: Path | None):
        self.file: TextIO | None = open(path, "w") if path else None

    def write(self, text: str) -> None:
        for f in (sys.stdout, self.file):
            if f is not None:
                f.write(text)
                f.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run_one(name: str, b: Benchmark, cmd: list[str], out: Tee) -> tuple[int | None, float]:
    """Run one script, streaming its output into a fenced block; (exit status or None if missing, wall s)."""
    out.write(f"\n## {name}: {b.about}\n\n    $ {shlex.join(cmd)}\n\n")
    if not (REPO / b.script).is_file():
        out.write(f"{b.script} not found: skipped (counted as failed)\n")
        return None, 0.0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    out.write("```\n")
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        last = "\n"
        for last in proc.stdout:
            out.write(last)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if not last.endswith("\n"):
        out.write("\n")  # the closing fence on a line of its own
    out.write(f"```\n\n{name}: exit {rc} in {wall:.0f} s\n")
    return rc, wall


def summary(results: dict[str, tuple[int | None, float]], cmds: dict[str, list[str]]) -> str:
    lines = ["\n## Summary\n", "| benchmark | result | wall s | command |", "|---|---|---|---|"]
    for name, (rc, wall) in results.items():
        result = "ok" if rc == 0 else "missing" if rc is None else f"FAILED (exit {rc})"
        lines.append(f"| {name} | {result} | {wall:.0f} | `{shlex.join(cmds[name])}` |")
    failed = [n for n, (rc, _) in results.items() if rc != 0]
    lines.append("")
    lines.append(f"failed: {', '.join(failed)}" if failed else f"all {len(results)} benchmark script(s) exited 0")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    cmds = {n: command(BENCHMARKS[n], args.quick) for n in args.names}
    out = Tee(args.out)
    try:
        out.write(f"# jaxckpt benchmarks{' (--quick)' if args.quick else ''}\n\n"
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}: {os.cpu_count()} CPUs, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; Python {platform.python_version()}; "
                  f"from {REPO}\n")
        results = {n: run_one(n, BENCHMARKS[n], cmds[n], out) for n in args.names}
        out.write(summary(results, cmds))
    finally:
        out.close()
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
