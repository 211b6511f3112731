"""``jaxckpt launch --processes N -- train …``: N local JAX processes for testing multi-host runs.

Each child gets ``JAXCKPT_COORDINATOR``/``JAXCKPT_NUM_PROCESSES``/``JAXCKPT_PROCESS_ID`` and its own
fake CPU devices. SIGTERM/SIGINT to the launcher go to every child. When one child fails, the others
get ``grace_s`` to finish on their own (a dead peer makes JAX fail them), then are killed. The exit
status is the first non-zero child status (143 when preempted), else 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port that was free a moment ago (bound by the OS, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(rank: int, n: int, port: int, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env.update(
        JAXCKPT_COORDINATOR=f"127.0.0.1:{port}", JAXCKPT_NUM_PROCESSES=str(n), JAXCKPT_PROCESS_ID=str(rank),
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
    )
    return env


def launch(args: list[str], processes: int, devices_per_process: int, grace_s: float = 60.0) -> int:
    """Run ``jaxckpt ARGS`` in ``processes`` cooperating processes; returns the combined exit status."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxckpt.cli", *args]
    children = [subprocess.Popen(cmd, env=child_env(r, processes, port, devices_per_process))
                for r in range(processes)]

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(children, grace_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()


def _supervise(children: list[subprocess.Popen], grace_s: float) -> int:
    first_bad, deadline = 0, None
    while any(c.poll() is None for c in children):
        for rank, c in enumerate(children):
            code = c.poll()
            if code not in (None, 0) and not first_bad:
                first_bad = code if code > 0 else 128 - code
                deadline = time.monotonic() + grace_s
                print(f"[jaxckpt launch] process {rank} exited with status {first_bad}; "
                      f"waiting up to {grace_s:.0f}s for the others", file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            print("[jaxckpt launch] killing the remaining processes", file=sys.stderr, flush=True)
            for c in children:
                if c.poll() is None:
                    c.kill()
        time.sleep(0.1)
    codes = [c.returncode if c.returncode >= 0 else 128 - c.returncode for c in children]
    return first_bad or next((x for x in codes if x), 0)
