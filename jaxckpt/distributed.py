"""Multi-controller JAX: initialise ``jax.distributed`` when launched as one of several processes.

Sources, in order: explicit ``--coordinator/--num-processes/--process-id`` flags, the variables
``JAXCKPT_COORDINATOR``/``JAXCKPT_NUM_PROCESSES``/``JAXCKPT_PROCESS_ID`` (set by ``jaxckpt launch``),
then cluster auto-detection (SLURM with several tasks, multi-worker TPU VMs). Otherwise: one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np

ENV_COORD, ENV_NUM, ENV_ID = "JAXCKPT_COORDINATOR", "JAXCKPT_NUM_PROCESSES", "JAXCKPT_PROCESS_ID"


@dataclass(frozen=True)
class Launch:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 60


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def from_env(launch: Launch) -> Launch:
    """Fill unset fields from the ``JAXCKPT_*`` variables."""
    if launch.coordinator is None and ENV_COORD in os.environ:
        return Launch(os.environ[ENV_COORD], int(os.environ[ENV_NUM]), int(os.environ[ENV_ID]),
                      launch.heartbeat_timeout_s)
    return launch


def initialize(launch: Launch) -> bool:
    """Start the multi-controller runtime if this is a multi-process launch; True if it did."""
    launch = from_env(launch)
    if launch.coordinator is None and not _cluster_detected():
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or launch.coordinator is not None:
        # CPU processes talk over gloo; harmless for accelerator backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"heartbeat_timeout_seconds": launch.heartbeat_timeout_s}
    if launch.coordinator is not None:
        kwargs.update(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                      process_id=launch.process_id)
    jax.distributed.initialize(**kwargs)
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """All processes reach this point before any continues (no-op in one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's ``value``, on every process (identity in one process)."""
    if not is_multiprocess():
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_true(flag: bool) -> bool:
    """True on every process iff ``flag`` is true on every process."""
    if not is_multiprocess():
        return flag
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))
