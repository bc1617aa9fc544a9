"""executor=multi's worker processes, spawned (as on Windows) before the driver imports the
model code: each imports torch, diffusers and the classes a load needs (seconds) while the
driver imports its own and prepares the run, then waits for the run's Setup on its pipe.

This module imports no model code itself, so the command line can start the workers first.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

from sdbatch.schema import Executor


def kind(device: str) -> str:
    """The device type of a torch device name: "cuda" of "cuda:1"."""
    return device.split(":")[0]


def visible_devices() -> list[str]:
    """Every GPU torch sees: the default of executor.devices."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def devices(executor: Executor) -> list[str]:
    """The devices executor=multi runs a worker on."""
    return list(executor.devices) if executor.devices else visible_devices()


def worker_threads(threads: int, devices: list[str]) -> int:
    """Torch threads per worker: the given count, or on CPU workers the cores shared out
    (two workers each spinning every core would be slower than one)."""
    if threads:
        return threads
    cpu_workers = sum(1 for d in devices if kind(d) == "cpu")
    return max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0


@dataclass
class Started:
    """A worker process and the driver's end of its pipe."""

    device: str
    process: mp.process.BaseProcess
    conn: Connection

    def kill(self) -> None:
        """End the process at once (it ignores SIGTERM): one the run never gave work (it
        stopped before its pool opened), or one that did not stop when told."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


def start(device: str, threads: int, name: str) -> Started:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    process = ctx.Process(target=_main, name=name, daemon=True, args=(device, threads, theirs))
    process.start()
    theirs.close()  # the worker's end lives in the worker only: its death ends the pipe
    return Started(device, process, mine)


def _main(device: str, threads: int, conn: Connection) -> None:
    """A worker process. It ignores Ctrl-C and SIGTERM: the driver decides when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from sdbatch.executors.multi import serve  # the model code: seconds, the driver's too

    serve(device, threads, conn)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the driver waits for this exit; tearing down torch's modules writes nothing


@contextmanager
def early(executor: Executor) -> Iterator[list[Started]]:
    """executor=multi's workers, started now and ended with the run (those its pool never
    took are killed). None where the devices are of mixed types: the run reports that."""
    started: list[Started] = []
    if executor.name == "multi":
        names = devices(executor)
        if names and len({kind(d) for d in names}) == 1:
            threads = worker_threads(executor.threads, names)
            started = [start(d, threads, f"sdbatch-worker-{w}") for w, d in enumerate(names)]
    try:
        yield started
    finally:
        for s in started:
            s.kill()
