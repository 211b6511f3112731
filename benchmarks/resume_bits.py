"""Does a resumed run equal an uninterrupted one, bit for bit, on this machine? End to end, through the CLI.

    python benchmarks/resume_bits.py                                  # configs/small.py, 40 steps, stop at 20
    python benchmarks/resume_bits.py --deterministic true --steps 30 --stop-at 15 model.dropout=0.1

For ``train.deterministic`` false and true: one ``jaxckpt train`` of ``--steps`` steps, and one stopped at
``--stop-at`` (``--stop-at-step``: a checkpoint, a clean exit) then resumed by the same command in a new
process. Every process gets its own empty compilation cache, so the resumed one compiles the step afresh,
as after a move to another machine or a jaxckpt upgrade. The resumed run must log the same loss bits (and eval
losses) at every step after the stop, and end in a checkpoint whose arrays (params, optimizer state, step, RNG) equal
the uninterrupted run's bitwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxckpt.checkpoint import list_steps  # noqa: E402
from jaxckpt.metrics import read_metrics  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stop-at", type=int, default=20)
    p.add_argument("--deterministic", default="false,true", help="train.deterministic settings, comma-separated")
    p.add_argument("--keep", type=Path, help="keep the workdirs here (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides for every run")
    return p.parse_args(argv)


def train(args: argparse.Namespace, workdir: Path, cache: Path, setting: str, stop_at: int | None) -> float:
    """One ``jaxckpt train`` process; its wall seconds."""
    cmd = [sys.executable, "-m", "jaxckpt.cli", "train", "--config", args.config, "--workdir", str(workdir),
           *(["--stop-at-step", str(stop_at)] if stop_at is not None else []),
           f"train.steps={args.steps}", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
           f"train.deterministic={setting}", f"train.compilation_cache={cache}", *args.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nexited with {proc.returncode}:\n{proc.stdout[-4000:]}")
    return time.perf_counter() - t0


def final_state(workdir: Path) -> dict[str, np.ndarray]:
    """The newest checkpoint's state, every array as host numpy, read with plain Orbax."""
    root = workdir / "checkpoints"
    path = root / str(list_steps(root)[-1]) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def compare(ref: Path, resumed: Path, after: int) -> tuple[str, str]:
    """(verdict on the losses and eval losses logged after step ``after``, verdict on the final state) of
    ``resumed`` against ``ref``."""
    def logged(workdir: Path) -> dict[tuple[int, str], float]:
        return {(int(r["step"]), k): r[k] for r in read_metrics(workdir) for k in ("loss", "eval_loss") if k in r}

    a, b = logged(ref), logged(resumed)
    keys = sorted(k for k in a if k[0] > after)
    differ = [k for k in keys if a[k] != b.get(k)]
    loss_verdict = f"{len(keys)} of {len(keys)} equal" if not differ else (
        f"{len(differ)} of {len(keys)} differ (first: step {differ[0][0]} {differ[0][1]}, "
        f"{a[differ[0]]!r} vs {b.get(differ[0])!r})")
    sa, sb = final_state(ref), final_state(resumed)
    bad = [k for k in sa if k not in sb or sa[k].dtype != sb[k].dtype or not np.array_equal(sa[k], sb[k])]
    return loss_verdict, (f"{len(sa)} of {len(sa)} arrays equal" if not bad else
                          f"{len(bad)} of {len(sa)} arrays differ (e.g. {bad[0]})")


def check(args: argparse.Namespace, root: Path, setting: str) -> str:
    d = root / setting
    t_ref = train(args, d / "ref", d / "cache-ref", setting, None)
    t_stop = train(args, d / "resumed", d / "cache-stop", setting, args.stop_at)
    t_resume = train(args, d / "resumed", d / "cache-resume", setting, None)
    losses, state = compare(d / "ref", d / "resumed", args.stop_at)
    verdict = "PASS" if "differ" not in losses + state else "FAIL"
    return (f"| {setting} | {losses} | {state} | {t_ref:.0f} / {t_stop:.0f} / {t_resume:.0f} | **{verdict}** |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # This process only starts the runs and compares them: off the accelerator, so the memory stays theirs.
    jax.config.update("jax_platforms", "cpu")
    probe = ("import jax; d = jax.devices(); "
             "print(f'{len(d)} x {d[0].device_kind} ({d[0].platform}); jax {jax.__version__}')")
    devices = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    print(f"{devices}; {args.config}, {args.steps} steps, stopped at {args.stop_at} and resumed in a new process "
          "with an empty cache", flush=True)
    root = args.keep or Path(tempfile.mkdtemp(prefix="resume_bits-"))
    rows = ["| train.deterministic | losses, eval losses after the stop | final checkpoint "
            "| seconds: ref / stop / resume | verdict |", "|---|---|---|---|---|"]
    try:
        for setting in args.deterministic.split(","):
            rows.append(check(args, root, setting))
            print(rows[-1], flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(rows))
    return 0 if all("**PASS**" in r for r in rows[2:]) else 1


if __name__ == "__main__":
    sys.exit(main())
