"""``jaxckpt`` command line: thin parsing, then calls into the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxckpt import gcpause  # gc and threading only: ready before the imports it pauses

EPILOG = "Overrides: section.key=value, e.g. train.steps=200 mesh.fsdp=2 model.dtype=bfloat16"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxckpt", description="Sharded JAX/Flax LM training with exact resume.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train (resumes automatically from DIR/checkpoints)", epilog=EPILOG)
    t.add_argument("--config", help="config file defining get_config() (default: built-in tiny config)")
    t.add_argument("--workdir", help="run directory (default: ./runs/<config name>)")
    t.add_argument("--stop-at-step", type=int, default=None,
                   help="save a checkpoint at this step and exit (resume later with the same command)")
    t.add_argument("--coordinator", help="multi-process: coordinator HOST:PORT (process 0's address)")
    t.add_argument("--num-processes", type=int, help="multi-process: total number of processes")
    t.add_argument("--process-id", type=int, help="multi-process: this process's index")
    t.add_argument("--heartbeat-timeout", type=int, default=60,
                   help="multi-process: seconds before a silent peer is declared dead (default 60)")
    t.add_argument("overrides", nargs="*", help="section.key=value config overrides")

    rp = sub.add_parser("report", help="a run's history across restarts: times, lost steps, goodput")
    rp.add_argument("dir", type=Path)
    rp.add_argument("--plot", type=Path, help="also draw the loss curve with restarts to this PNG")

    sp = sub.add_parser("sample", help="generate text from a checkpoint")
    sp.add_argument("dir", type=Path, help="workdir or checkpoints dir, optionally DIR:STEP")
    sp.add_argument("--prompt", default="")
    sp.add_argument("--tokens", type=int, default=200)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--seed", type=int, default=0)

    la = sub.add_parser("launch", help="run a command in N local JAX processes (multi-host testing)")
    la.add_argument("--processes", type=int, default=2)
    la.add_argument("--devices-per-process", type=int, default=2, help="fake CPU devices per process")
    la.add_argument("--grace", type=float, default=60.0, help="seconds the others get after one fails")
    la.add_argument("args", nargs=argparse.REMAINDER, help="-- train …")

    pr = sub.add_parser("prepare", help="tokenize text files into a dataset directory")
    pr.add_argument("--input", nargs="+", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--tokenizer", default="bytes", help="bytes (default), a SentencePiece .model or tokenizer.json")
    pr.add_argument("--val-fraction", type=float, default=0.05)
    pr.add_argument("--force", action="store_true", help="rebuild an existing dataset")

    c = sub.add_parser("ckpt", help="list, inspect or export checkpoints")
    csub = c.add_subparsers(dest="ckpt_cmd", required=True)
    cl = csub.add_parser("list", help="steps, times, sizes and why each is kept")
    cl.add_argument("dir", type=Path)
    ci = csub.add_parser("inspect", help="array tree, config and metrics of one checkpoint")
    ci.add_argument("dir", type=Path)
    ci.add_argument("--step", type=int)
    cv = csub.add_parser("verify", help="check every byte against the checkpoint's checksum manifest")
    cv.add_argument("dir", type=Path)
    cv.add_argument("--step", type=int)
    ce = csub.add_parser("export", help="params only, to .safetensors or .npz")
    ce.add_argument("dir", type=Path)
    ce.add_argument("--step", type=int)
    ce.add_argument("--out", type=Path, required=True)

    # Every argument after "bench" (its -h included) is benchmarks/run.py's: no option prefix is parsed here.
    b = sub.add_parser("bench", help="run the benchmark suite, benchmarks/run.py (source checkout only; "
                       "'jaxckpt bench --help' for its options)", prefix_chars="+", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER, help="benchmarks/run.py's arguments, e.g. --quick --only restart")
    return p


def _train(args: argparse.Namespace) -> int:
    from jaxckpt.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before JAX is imported
    from jaxckpt import distributed
    from jaxckpt.trainer import train

    launch = distributed.Launch(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    distributed.initialize(launch)
    name = Path(args.config).stem if args.config else "default"
    workdir = Path(args.workdir) if args.workdir else Path("runs") / name
    result = train(cfg, workdir, stop_at=args.stop_at_step)
    loss = result.metrics.get("loss", float("nan"))
    import jax

    if jax.process_index() == 0:
        print(f"[jaxckpt] done: step {result.step}, loss {loss:.4f}, workdir {workdir}", file=sys.stderr)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from jaxckpt.launch import launch

    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not rest:
        raise FileNotFoundError("usage: jaxckpt launch --processes N -- train [train args…]")
    return launch(rest, args.processes, args.devices_per_process, args.grace)


def _report(args: argparse.Namespace) -> int:
    from jaxckpt import report

    print(report.table(args.dir))
    if args.plot:
        print(f"plot: {report.plot(args.dir, args.plot)}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from jaxckpt.sample import sample

    print(sample(str(args.dir), args.prompt, args.tokens, args.temperature, args.seed))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from jaxckpt.data import prepare

    meta = prepare(args.input, args.out, args.tokenizer, args.val_fraction, args.force)
    print(f"prepared {args.out}: {meta['n_train']:,} train + {meta['n_val']:,} val tokens "
          f"({meta['tokenizer']}, vocab {meta['vocab_size']})")
    print(f"train on it with: jaxckpt train data.path={args.out} model.vocab_size={max(meta['vocab_size'], 256)}")
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from jaxckpt import ckpt_tools

    if args.ckpt_cmd == "list":
        print(ckpt_tools.list_table(args.dir))
    elif args.ckpt_cmd == "inspect":
        print(ckpt_tools.inspect(args.dir, args.step))
    elif args.ckpt_cmd == "verify":
        ok, report = ckpt_tools.verify(args.dir, args.step)
        print(report)
        return 0 if ok else 1
    else:
        print(ckpt_tools.export(args.dir, args.step, args.out))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    import jaxckpt

    bench = Path(jaxckpt.__file__).resolve().parents[1] / "benchmarks"
    if not (bench / "run.py").is_file():
        raise FileNotFoundError(f"{bench} not found: benchmarks/ ships with the source checkout; run from a git clone")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.call([sys.executable, str(bench / "run.py"), *rest])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxckpt.errors import (
        EXIT_PREEMPTED,
        CheckpointSaveError,
        ConfigError,
        Preempted,
        ResumeError,
        WorkdirLocked,
    )

    handlers = {"train": _train, "prepare": _prepare, "ckpt": _ckpt, "launch": _launch,
                "report": _report, "sample": _sample, "bench": _bench}
    try:
        return handlers[args.cmd](args)
    except Preempted as e:
        print(f"[jaxckpt] {e}; re-run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ConfigError, ResumeError, WorkdirLocked, FileNotFoundError, FileExistsError) as e:
        print(f"jaxckpt: error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveError as e:
        print(f"jaxckpt: error: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """The ``jaxckpt`` script: ``train`` and ``launch`` start again under TCMalloc first (jaxckpt.malloc);
    ``train`` pauses cyclic collection through start-up (jaxckpt.gcpause)."""
    if sys.argv[1:2] == ["train"]:
        gcpause.begin_start_up()  # before the imports: the trainer ends it after its first step
    if sys.argv[1:2] in (["train"], ["launch"]):
        from jaxckpt import malloc
        from jaxckpt.errors import ConfigError

        try:
            malloc.reexec()
        except ConfigError as e:  # a bad $JAXCKPT_MALLOC
            print(f"jaxckpt: error: {e}", file=sys.stderr)
            sys.exit(2)
    sys.exit(main())


if __name__ == "__main__":
    run()
