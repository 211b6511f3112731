"""Test setup: 8 fake CPU devices, set before JAX is imported; collectives fail fast instead of hanging."""

import os

FAKE_DEVICES = 8
XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={FAKE_DEVICES} "
    "--xla_cpu_collective_call_terminate_timeout_seconds=120"
)
os.environ["XLA_FLAGS"] = XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
