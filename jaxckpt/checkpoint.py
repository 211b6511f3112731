"""Checkpointer: one Orbax ``CheckpointManager`` writing ``state`` + ``data`` + ``meta`` per step.

Layout: ``DIR/checkpoints/<step>/{state,data,meta}``. ``state`` holds the sharded train state
(uncompressed zarr3 on OCDBT), ``data`` the Grain iterator state, ``meta`` JSON with the resolved
config, mesh, versions, data fingerprint and position, and the metrics at that step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxckpt import d2h, distributed, fastread, gcpause, integrity, pacing, substores
from jaxckpt.config import CheckpointConfig
from jaxckpt.errors import CheckpointSaveError, ConfigError
from jaxckpt.layout import convert, is_stacked, other_layout
from jaxckpt.metrics import log
from jaxckpt.policies import Clock, retention, save_schedule

PyTree = Any
# Orbax's default (2 GiB) puts a 1 GB state in two data files; ~64 MiB files are written and fsynced
# concurrently: durable save 3.74 s -> 3.11 s for 0.98 GB here (benchmarks/README.md). Still plain OCDBT.
OCDBT_TARGET_FILE_BYTES = 64 << 20
# Retention moves a step here (Orbax's todelete_subdir: one rename) and the files go right before the next
# save writes. The kernel then fills the new files' page cache with the deleted files' pages instead of
# fresh memory, which on a VM that returns free memory to its host costs ~10x as much to touch: 1 GB
# saves in a row, 1.4-1.5 s -> 0.8-1.0 s here (benchmarks/README.md §1d). The rmtree (0.16 s per GB) also
# leaves the train loop's thread, and peak disk use stays the same: one checkpoint more than retention keeps.
TODELETE = ".deleted"
ITEMS = ("state", "data", "meta")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _type_handlers(store_bytes: int = substores.STORE_BYTES) -> Any:
    """Orbax's default type handlers, but jax.Array without replica-parallel writes, through jaxckpt.d2h.

    Replica-parallel saving slices replicated arrays with eager jax ops, which compiles a
    program per shape on the first save (~2 s blocking on CPU); each shard is written once anyway.
    """
    from orbax.checkpoint._src.metadata import array_metadata_store
    from orbax.checkpoint._src.serialization import type_handler_registry as thr

    array = d2h.LeanArrayHandler(
        replica_id=d2h.REPLICA_ID, use_replica_parallel=False, array_metadata_store=array_metadata_store.Store(),
        store_bytes=store_bytes,
    )
    defaults = [(t, h) for t, h in thr._DEFAULT_TYPE_HANDLERS if t is not jax.Array]  # noqa: SLF001
    return thr.create_type_handler_registry(*defaults, (jax.Array, array))


def state_handler(store_bytes: int = substores.STORE_BYTES) -> ocp.PyTreeCheckpointHandler:
    # Compression costs most of the save time on few cores for little space (DESIGN.md §3).
    # Host copies into pinned memory where Orbax's default puts them (GPUs): the handler and
    # jaxckpt.d2h.Snapshot follow the same switch.
    return ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, use_zarr3=True, use_compression=False, type_handler_registry=_type_handlers(store_bytes),
        enable_pinned_host_transfer=d2h.pinned_by_default(),
    )


def make_manager(directory: Path, async_save: bool = True, read_only: bool = False,
                 store_bytes: int = substores.STORE_BYTES) -> ocp.CheckpointManager:
    """jaxckpt's Orbax manager: items state, data, meta; a save over ``store_bytes`` per process in several
    OCDBT stores (:mod:`jaxckpt.substores`)."""
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        save_decision_policy=None,
        enable_background_delete=False,
        todelete_subdir=TODELETE,
    )
    handlers = {
        "state": state_handler(store_bytes),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def gc_paused() -> contextlib.AbstractContextManager[None]:
    """No cyclic garbage collection while Orbax starts a save (the part that blocks training).

    Its per-shard bookkeeping allocates enough small objects to set off collections in the middle. With
    8 fake devices and 1 GB (1,423 shards), a first save blocked 0.21 s -> 0.16 s, later ones 0.12-0.15 s
    -> 0.11 s (benchmarks/README.md, §1b). Counted with the pause around the shard writes
    (:mod:`jaxckpt.gcpause`), which may still be running from the save before.
    """
    return gcpause.paused()


def _is_enospc(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def read_meta(directory: Path, step: int) -> dict[str, Any]:
    """The ``meta`` item of a checkpoint, read straight from its JSON file."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())


class FrozenIterator:
    """A Grain iterator's state as of now. Grain's ``CheckpointHandler`` saves it exactly as it would the
    iterator (the same JSON file), however far the iterator has moved on by the time the save runs."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        # Grain's handler writes json.dumps(state, indent=4) for a DatasetIterator, else state.decode().
        self._state = json.dumps(state, indent=4).encode() if isinstance(iterator, grain.DatasetIterator) else state

    def get_state(self) -> bytes:
        return self._state


class SaveStart:
    """``manager.save(step, args)`` run on a thread once the state's bytes are on the host.

    The caller waits only for :class:`jaxckpt.d2h.Snapshot`; the rest of what Orbax does before its
    writes begin (per-array bookkeeping, directories, metadata: most of the blocking time with many
    shards, benchmarks/README.md §1b) runs beside the next train steps. ``args`` must hold nothing the
    caller changes later: :class:`FrozenIterator` for the data, a copied ``meta``. Only for one process
    (see :func:`starts_in_background`). Until :meth:`join` returns, nothing else may use the manager.
    """

    def __init__(self, manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite, state: PyTree,
                 before: Callable[[], None] = lambda: None, nice: int = 0, pacer: pacing.WritePacer | None = None,
                 idle: bool = False):
        """``before`` runs on the thread ahead of Orbax's save call; the thread, and the threads Orbax and
        TensorStore start from it, run at nice ``nice``, and in SCHED_IDLE if ``idle`` (:func:`lower_save_threads`);
        ``pacer`` paces the array writes (:mod:`jaxckpt.pacing`)."""
        self.error: BaseException | None = None
        self._before, self._nice, self._idle, self._pacer = before, nice, idle, pacer
        self._snapshot = d2h.Snapshot(state)
        self._thread = threading.Thread(target=self._run, args=(manager, step, args), name="jaxckpt-save-start")
        self._thread.start()

    def _run(self, manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
        try:
            lower_save_threads(self._nice, self._idle)
            self._before()
            with pacing.pacing(self._pacer):
                manager.save(step, args=args, force=True)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by join()
            self.error = e
        finally:
            self._snapshot.release()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, reraise: bool = True) -> None:
        """Wait until Orbax's save call has returned; re-raise its error, if any and ``reraise``."""
        self._thread.join()
        if self.error is not None and reraise:
            raise self.error


def native_threads() -> Iterator[tuple[int, str]]:
    """(thread id, name as the kernel has it) of each of this process's live threads (Linux ``/proc``)."""
    for task in Path("/proc/self/task").iterdir():
        try:
            yield int(task.name), (task / "comm").read_text().strip()
        except (OSError, ValueError):  # the thread ended meanwhile
            continue


def lower_this_thread(nice: int, idle: bool = False) -> bool:
    """Nice ``nice`` for the calling thread, and Linux's SCHED_IDLE class if ``idle``; the threads it starts
    from now on inherit both. Linux only; False (nothing done) elsewhere or for nice 0. An unprivileged
    thread cannot be raised back, so call this only on threads that do nothing but checkpoint I/O."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    _lower(threading.get_native_id(), nice, idle)
    return True


def _lower(tid: int, nice: int, idle: bool) -> None:
    """SCHED_IDLE: the thread runs only on CPU time no other thread wants. A nice value alone still takes a
    share of busy cores, and a woken train-step thread may wait for its turn (benchmarks/README.md §2)."""
    os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    if idle:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except PermissionError:  # a sandbox that forbids it (seccomp): the nice value alone
            pass


def lower_save_threads(nice: int, idle: bool = False) -> None:
    """:func:`lower_this_thread`, and the same for TensorStore's workers (named ``ts_*``), which a restore
    may have started before at nice 0; they only move checkpoint bytes."""
    if not lower_this_thread(nice, idle):
        return
    for tid, name in native_threads():
        if name.startswith("ts_"):
            try:
                _lower(tid, nice, idle)
            except OSError:  # the thread ended meanwhile
                continue


def starts_in_background(state: PyTree) -> bool:
    """Whether a save of ``state`` may return before Orbax's ``save`` does (:class:`SaveStart`).

    Not with several processes: Orbax's save synchronises them with device collectives
    (``sync_global_devices``), which must not interleave with the train step's own. Not for trees with
    leaves the snapshot does not take (:func:`jaxckpt.d2h.snapshot_covers`).
    """
    return not distributed.is_multiprocess() and d2h.snapshot_covers(state)


@dataclass
class _Pending:
    step: int
    t0: float
    blocking: float
    start: SaveStart | None = None  # Orbax's save call, while it runs on a thread
    pacer: pacing.WritePacer | None = None  # the save's write pace, lifted by wait()
    checksums: integrity.EarlyChecksums | None = None  # CRC32s taken in wait() while Orbax still writes
    finalizer: threading.Thread | None = None
    error: BaseException | None = None
    durable_at: float | None = None  # when the manifest was written (the step may be noticed later)


class Checkpointer:
    """Save policy, retention, integrity manifests and exact restore around one ``CheckpointManager``.

    A save goes: host snapshot (the only part that blocks, :class:`SaveStart`) -> Orbax's save call and
    async write + commit -> (background) fsync + checksum manifest -> retention. Only steps with a
    manifest count as complete.
    """

    def __init__(self, directory: Path, cfg: CheckpointConfig, clock: Clock = time.monotonic,
                 on_event: Callable[..., None] | None = None):
        self.directory, self.cfg, self.clock = Path(directory).absolute(), cfg, clock
        self.on_event = on_event or (lambda kind, **fields: None)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = make_manager(self.directory, cfg.async_save, store_bytes=max(1, int(cfg.ocdbt_store_mb * 2**20)))
        self._purge_deleted()  # an earlier run's, if it stopped between retention and its next save
        self.schedule = save_schedule(cfg, clock)
        self.retention = retention(cfg)
        self._metrics: dict[int, dict[str, float]] = {}
        self._pending: _Pending | None = None
        self._failed_steps: set[int] = set()  # their leftovers are removed again once Orbax's threads stop
        self.last_blocking_s = 0.0
        self.last_durable_s = 0.0

    # -- queries ---------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if self._pending is not None and self._pending.start is not None:
            self._pending.start.join(reraise=False)  # the manager is not to be used while Orbax's save runs
        return sorted(self.manager.all_steps())

    def complete_steps(self) -> list[int]:
        return [s for s in self.steps() if integrity.has_manifest(self.step_dir(s))]

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _tmp_dirs(self, step: int) -> Iterator[Path]:
        """Where Orbax writes ``step`` until its commit renames it to :meth:`step_dir`."""
        return self.directory.glob(f"{step}.orbax-checkpoint-tmp*")

    def meta(self, step: int) -> dict[str, Any]:
        return read_meta(self.directory, step)

    def should_save(self, step: int) -> bool:
        return self.cfg.enabled and self.schedule.should_save(step)

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, data_iter: Any, meta: dict[str, Any], paced: bool = False) -> float:
        """Start saving ``step``; returns the seconds the caller was blocked. ``paced``: training goes on
        beside this save, whose writes may then keep to ``checkpoint.write_mb_s`` (:meth:`pacer_for`)."""
        self.wait()
        t0 = time.perf_counter()
        gcpause.freeze()  # until _complete or _failed: collections meanwhile walk only what the save allocates
        self.schedule.saved(step)
        start, pacer = None, None
        try:
            args = ocp.args.Composite(
                state=ocp.args.PyTreeSave(state, ocdbt_target_data_file_size=OCDBT_TARGET_FILE_BYTES),
                data=grain.checkpoint.CheckpointSave(FrozenIterator(data_iter)),
                meta=ocp.args.JsonSave(json.loads(json.dumps(meta))),
            )
            with gc_paused():
                if self.cfg.async_save and starts_in_background(state):
                    pacer = self.pacer_for(paced)
                    start = SaveStart(self.manager, step, args, state, self._purge_deleted, nice=self.cfg.save_nice,
                                      pacer=pacer, idle=self.cfg.save_idle)
                else:
                    self._purge_deleted()
                    self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure here is a failed save
            self._failed(step, e)
            return time.perf_counter() - t0
        blocking = time.perf_counter() - t0
        self._metrics[step] = dict(meta.get("metrics", {}))
        self._pending = _Pending(step, t0, blocking, start, pacer)
        self.last_blocking_s = blocking
        if not self.cfg.async_save:
            self.wait()
        return blocking

    def pacer_for(self, paced: bool) -> pacing.WritePacer | None:
        """A pace for a save beside training that would take the train step's cores; None: write at once."""
        if not paced or self.cfg.write_mb_s <= 0 or not pacing.shares_cores():
            return None
        return pacing.WritePacer(self.cfg.write_mb_s)

    def _purge_deleted(self) -> None:
        """Remove the steps retention moved to :data:`TODELETE` (process 0; they are no checkpoints now)."""
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / TODELETE, ignore_errors=True)

    def _failed(self, step: int, e: BaseException) -> None:
        """Turn a failed save into a clear message; remove its uncommitted leftovers."""
        if self._pending is not None and self._pending.checksums is not None:
            self._pending.checksums.stop()
        self._pending = None
        gcpause.thaw()
        self._failed_steps.add(step)
        self._remove_leftovers(step)
        self.manager.reload()
        cause = "the disk is full" if _is_enospc(e) else f"{type(e).__name__}: {e}"
        msg = (f"saving checkpoint {step} to {self.directory} failed: {cause}. Committed checkpoints "
               f"{self.complete_steps()} are intact. Free space or point --workdir at writable storage"
               + ("; training continues (checkpoint.on_save_error=continue)."
                  if self.cfg.on_save_error == "continue" else
                  ", then re-run the same command to resume (or set checkpoint.on_save_error=continue)."))
        if self.cfg.on_save_error == "continue":
            log("WARNING: " + msg)
            return
        raise CheckpointSaveError(msg) from e

    def _remove_leftovers(self, step: int) -> None:
        """Delete what a failed save of ``step`` wrote (process 0): its temp dirs, a step dir without manifest."""
        if jax.process_index() == 0:
            for tmp in self._tmp_dirs(step):
                shutil.rmtree(tmp, ignore_errors=True)
            if self.step_dir(step).exists() and not integrity.has_manifest(self.step_dir(step)):
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def _finalize(self, pending: _Pending) -> None:
        try:
            lower_this_thread(self.cfg.save_nice, self.cfg.save_idle)  # the save's start lowered TensorStore's
            known = pending.checksums.stop() if pending.checksums is not None else None
            integrity.write_manifest(self.step_dir(pending.step), known)
            pending.durable_at = time.perf_counter()
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            pending.error = e

    def _start_finalizer(self, p: _Pending) -> bool:
        """Once Orbax committed ``p``: start the manifest thread (process 0). False if not committed yet."""
        if p.finalizer is not None:
            return True
        if p.start is not None:
            if not p.start.done():
                return False
            p.start.join()
        if self.manager.is_saving_in_progress():
            return False
        self.manager.check_for_errors()
        target = self._finalize if jax.process_index() == 0 else (lambda _: None)
        p.finalizer = threading.Thread(target=target, args=(p,), name="jaxckpt-manifest")
        p.finalizer.start()
        return True

    def poll(self) -> None:
        """Advance the pending save without blocking: committed -> manifest -> log + retention.

        With several processes only the manifest thread starts here; completion (which deletes
        old steps collectively) happens in ``wait()``, which every process reaches at the same step.
        """
        p = self._pending
        if p is None:
            return
        try:
            if not self._start_finalizer(p):
                return
        except Exception as e:  # noqa: BLE001
            return self._failed(p.step, e)
        if not distributed.is_multiprocess() and not p.finalizer.is_alive():
            self._complete(p)

    def wait(self) -> None:
        """Block until the pending save (if any) is durable, checksummed and retention applied."""
        p = self._pending
        if p is None:
            return
        if p.pacer is not None:
            p.pacer.lift()  # the caller waits: nothing left to share the cores with
        if self.cfg.async_save and p.finalizer is None and jax.process_index() == 0:
            # The caller waits anyway, so the cores are free: checksum the files Orbax has finished
            # while it writes the rest. (Beside training it would take CPU from the train steps.)
            p.checksums = integrity.EarlyChecksums(lambda: self._tmp_dirs(p.step)).start()
        try:
            if p.start is not None:
                p.start.join()
            self.manager.wait_until_finished()
            self._start_finalizer(p)
        except Exception as e:  # noqa: BLE001
            return self._failed(p.step, e)
        except BaseException:  # e.g. Ctrl-C while waiting: the save stays pending, the sweeping ends
            if p.checksums is not None:
                p.checksums.stop()
            raise
        p.finalizer.join()
        self._complete(p)

    def _complete(self, p: _Pending) -> None:
        self._pending = None
        gcpause.thaw()
        failed = distributed.agree(int(p.error is not None))
        if failed:
            return self._failed(p.step, p.error or OSError(f"process 0 failed to finalize step {p.step}"))
        distributed.barrier(f"jaxckpt_manifest_{p.step}")
        self.last_durable_s = (p.durable_at or time.perf_counter()) - p.t0
        size = dir_size(self.step_dir(p.step)) if jax.process_index() == 0 else 0
        self.on_event("checkpoint", step=p.step, blocking=p.blocking, durable=self.last_durable_s, bytes=size)
        log(f"checkpoint {p.step}: {size / 1e6:.1f} MB, blocked {p.blocking:.3f}s, "
            f"durable and verified in {self.last_durable_s:.2f}s")
        if p.pacer is None and self.last_durable_s > self.cfg.grace_seconds:  # a preemption lifts a pace
            log(f"WARNING: this save took {self.last_durable_s:.1f}s, more than checkpoint.grace_seconds="
                f"{self.cfg.grace_seconds:g}: a preemption notice may end the job before its checkpoint is durable")
        self.apply_retention()

    def apply_retention(self) -> list[int]:
        """Delete what the retention policy does not keep, plus leftovers of never-completed saves.

        A step loses its manifest first, so a deletion cut short by a kill leaves an incomplete
        step (ignored, then cleaned up here later), never one that looks complete but lacks files.
        Orbax then moves it to :data:`TODELETE`, whose files the next save removes.
        """
        steps = self.complete_steps()
        for s in steps:
            if s not in self._metrics:
                try:
                    self._metrics[s] = self.meta(s).get("metrics", {})
                except (OSError, ValueError):
                    self._metrics[s] = {}
        keep = self.retention.reasons(steps, self._metrics)
        deleted = [s for s, why in keep.items() if not why]
        newest = max(steps, default=-1)
        deleted += [s for s in self.steps() if s < newest and s not in keep]
        for s in sorted(deleted):
            if jax.process_index() == 0:
                (self.step_dir(s) / integrity.MANIFEST).unlink(missing_ok=True)
                integrity.fsync_dir(self.step_dir(s))
            distributed.barrier(f"jaxckpt_unmanifest_{s}")
            self.manager.delete(s)
        return sorted(deleted)

    def quarantine(self, step: int, reason: str) -> Path:
        """Move a bad step out of the way (never delete it) so it is not resumed or overwritten."""
        dest = self.directory.parent / "quarantine" / f"{step}-{distributed.agree(int(time.time()))}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.step_dir(step), dest)
            (dest / "QUARANTINED.txt").write_text(reason + "\n")
        distributed.barrier(f"jaxckpt_quarantine_{step}")
        self.manager.reload()
        log(f"moved bad checkpoint {step} to {dest}: {reason}")
        return dest

    # -- restoring -------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
        """Restore ``state`` into the shardings of ``abstract_state`` and, if given, the iterator."""
        state = self._fast_restore(step, abstract_state) if self.cfg.fast_restore else None
        items: dict[str, Any] = {}
        if state is None:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            items["state"] = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
        return restored["state"] if state is None else state

    def _fast_restore(self, step: int, abstract_state: PyTree) -> PyTree | None:
        """The state via :mod:`jaxckpt.fastread`, or None (on every process) if Orbax must read it."""
        try:
            state, why = fastread.restore(self.step_dir(step) / "state", abstract_state), ""
        except fastread.Unsupported as e:
            state, why = None, str(e)
        if not distributed.all_true(state is not None):
            log(f"checkpoint {step}: restoring through Orbax ({why or 'another process cannot use the fast reader'})")
            return None
        return state

    def close(self) -> None:
        """Finish the pending save, then close Orbax (whose own errors repeat a failure already reported)."""
        try:
            self.wait()
            self._purge_deleted()
        finally:
            gcpause.thaw()  # also when wait() was interrupted
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                logging.getLogger("jaxckpt.library").warning("closing the CheckpointManager failed", exc_info=e)
            # Orbax's own threads may still have been writing a failed save's files when _failed removed
            # them (the error of one array does not stop the others); they have stopped now.
            for step in self._failed_steps:
                self._remove_leftovers(step)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def remove_all(directory: Path) -> None:
    """Delete every checkpoint under ``directory`` (``train.resume=overwrite``)."""
    if Path(directory).exists():
        shutil.rmtree(directory)


def list_steps(directory: Path) -> list[int]:
    """Committed-looking step directories (Orbax temp dirs are ignored)."""
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def resolve(spec: str) -> tuple[Path, int]:
    """``PATH[:STEP]`` (a workdir, its ``checkpoints`` dir or a step dir) -> (checkpoints dir, step)."""
    path_s, _, step_s = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
    path = Path(path_s).absolute()  # Orbax refuses relative paths
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    elif path.name.isdigit() and (path / "state").is_dir():
        path, step_s = path.parent, step_s or path.name
    steps = list_steps(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoints found under {spec!r} (expected WORKDIR or WORKDIR/checkpoints)")
    step = int(step_s) if step_s else steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not in {path}; available: {steps}")
    return path, step


def param_name(path: tuple) -> str:
    """Dotted name of a tree path (``blocks.0.attn.wq``), the same for int and str dict keys."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree: PyTree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {param_name(k): tuple(getattr(v, "shape", ())) for k, v in flat}


def load_params(spec: str, abstract_params: PyTree) -> PyTree:
    """Params only from checkpoint ``spec`` into the target shardings; names and shapes checked."""
    directory, step = resolve(spec)
    item_dir = directory / str(step) / "state"
    saved = state_handler().metadata(item_dir).tree["params"]
    # The checkpoint's block layout (model.scan_layers) may differ from the model's: read it as saved, convert.
    source = abstract_params if is_stacked(saved) == is_stacked(abstract_params) else other_layout(abstract_params)
    want, have = _shapes(source), _shapes(saved)
    problems = [f"missing in checkpoint: {k}" for k in want if k not in have]
    problems += [f"unexpected in checkpoint: {k}" for k in have if k not in want]
    problems += [f"shape of {k}: checkpoint {have[k]} vs model {want[k]}" for k in want
                 if k in have and have[k] != want[k]]
    if problems:
        raise ConfigError(f"train.init_from={spec}: params do not match the model config:\n  "
                         + "\n  ".join(problems[:20]))
    target = {"params": source}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    with ocp.Checkpointer(state_handler()) as ckptr:
        return convert(ckptr.restore(item_dir, args=args)["params"], abstract_params)
