"""executor=multi: one worker process per device of this machine (spawned, as on Windows),
each with its own loaded stacks; the driver hands them batches and is the only writer of
the run folder.

A worker talks to the driver over a pipe of its own, so a worker that is killed breaks
only its pipe: the driver sees its process end, starts another on the same device and
hands the batch out again. Workers ignore Ctrl-C and SIGTERM: the driver decides when they
stop (after the batches in flight), so a pre-empted run writes what it has.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from dataclasses import replace
from multiprocessing.connection import Connection, wait

import numpy as np
import torch

from sdbatch.executors.driver import Died, Done
from sdbatch.executors.worker import Outcome, Setup, StepCallback, Task, Worker
from sdbatch.models.stack import StackLoadError
from sdbatch.stages.picture import Picture


def visible_devices() -> list[str]:
    """Every GPU torch sees: the default of executor.devices."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def worker_threads(threads: int, devices: list[str]) -> int:
    """Torch threads per worker: the given count, or on CPU workers the cores shared out
    (two workers each spinning every core would be slower than one)."""
    if threads:
        return threads
    cpu_workers = sum(1 for d in devices if torch.device(d).type == "cpu")
    return max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0


def _plain(picture: Picture) -> Picture:
    """Latents as numpy for the pipe (torch would pass them as shared-memory handles)."""
    return picture if picture.latents is None else replace(picture,
                                                           latents=picture.latents.numpy())


def _torch(picture: Picture) -> Picture:
    if isinstance(picture.latents, np.ndarray):
        return replace(picture, latents=torch.from_numpy(picture.latents))
    return picture


def _serve(setup: Setup, device: str, threads: int, conn: Connection) -> None:
    """A worker process: tasks in, outcomes (and step counts) out, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    worker = Worker(setup, torch.device(device))
    while (task := conn.recv()) is not None:
        task = replace(task, inputs={k: None if v is None else _torch(v)
                                     for k, v in task.inputs.items()})
        try:
            outcome = worker.run(task, lambda done, steps: conn.send(("step", done, steps)))
        except StackLoadError as e:
            conn.send(("fatal", str(e)))
            return
        if outcome.pictures is not None:
            outcome = replace(outcome, pictures=[_plain(p) for p in outcome.pictures])
        conn.send(("done", outcome, worker.holds))
    worker.release()


class ProcessPool:
    def __init__(self, setup: Setup, devices: list[str], threads: int,
                 on_step: StepCallback | None = None):
        self.setup, self.devices, self.on_step = setup, devices, on_step
        self.threads = worker_threads(threads, devices)
        self.workers = list(range(len(devices)))
        self._ctx = mp.get_context("spawn")
        self._procs: dict[int, mp.process.BaseProcess] = {}
        self._conns: dict[int, Connection] = {}
        self._holds: dict[int, str | None] = {}
        self._busy: set[int] = set()
        self.restarts = 0
        for w in self.workers:
            self._start(w)

    def _start(self, w: int) -> None:
        mine, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, name=f"sdbatch-worker-{w}", daemon=True,
                                 args=(self.setup, self.devices[w], self.threads, theirs))
        proc.start()
        theirs.close()  # the worker's end lives in the worker only: its death ends the pipe
        self._procs[w], self._conns[w], self._holds[w] = proc, mine, None

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def holds(self, worker: int) -> str | None:
        return self._holds[worker]

    def submit(self, worker: int, task: Task) -> None:
        inputs = {k: None if v is None else _plain(v) for k, v in task.inputs.items()}
        self._busy.add(worker)
        try:
            self._conns[worker].send(replace(task, inputs=inputs))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # it died idle: wait() finds it

    def wait(self) -> list[Done | Died]:
        events: list[Done | Died] = []
        while not events:
            by_conn = {self._conns[w]: w for w in self._busy}
            for conn in wait(list(by_conn)):
                w = by_conn[conn]
                try:
                    message = conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    events.append(self._died(w))
                    continue
                if message[0] == "step":
                    if self.on_step:
                        self.on_step(message[1], message[2])
                elif message[0] == "fatal":
                    raise StackLoadError(message[1])
                else:
                    _, outcome, holds = message
                    self._busy.discard(w)
                    self._holds[w] = holds
                    events.append(Done(w, _outcome(outcome)))
        return events

    def _died(self, w: int) -> Died:
        proc = self._procs[w]
        proc.join(timeout=5)
        why = f"worker {w} on {self.devices[w]} ended with exit code {proc.exitcode}"
        self._conns[w].close()
        self._busy.discard(w)
        self.restarts += 1
        self._start(w)
        return Died(w, why)

    def close(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send(None)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        for proc in self._procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns.values():
            conn.close()


def _outcome(outcome: Outcome) -> Outcome:
    if outcome.pictures is None:
        return outcome
    return replace(outcome, pictures=[_torch(p) for p in outcome.pictures])
