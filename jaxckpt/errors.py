"""The errors jaxckpt reports to people (no heavy imports: the CLI catches these before JAX loads)."""

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a terminated job


class ConfigError(ValueError):
    """A config or an override is invalid; the message says what and how to fix it."""


class ResumeError(RuntimeError):
    """Resuming is unsafe or impossible; the message lists why and how to proceed."""


class CheckpointSaveError(RuntimeError):
    """A save failed (full disk, unwritable storage); committed checkpoints are untouched."""


class WorkdirLocked(RuntimeError):
    """Another trainer holds the workdir."""


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint is durable."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"preempted by {signame}: checkpoint at step {step} is durable")
        self.step, self.signame = step, signame
