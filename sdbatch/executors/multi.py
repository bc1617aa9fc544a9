"""executor=multi: one worker process per device of this machine, each with its own loaded
stacks; the driver hands them batches and is the only writer of the run folder.

A worker talks to the driver over a pipe of its own, so a worker that is killed breaks
only its pipe: the driver sees its process end, starts another on the same device and
hands the batch out again. Workers ignore Ctrl-C and SIGTERM: the driver decides when they
stop (after the batches in flight), so a pre-empted run writes what it has. The processes
themselves are started by processes.py, before the driver imports this module.
"""

from __future__ import annotations

from dataclasses import replace
from multiprocessing.connection import Connection, wait

import numpy as np
import torch

from sdbatch.executors import processes
from sdbatch.executors.driver import Died, Done
from sdbatch.executors.worker import Outcome, Setup, StepCallback, Task, Worker
from sdbatch.models.single_file import import_model_classes
from sdbatch.models.stack import StackLoadError
from sdbatch.stages.picture import Picture


def _plain(picture: Picture) -> Picture:
    """Latents as numpy for the pipe (torch would pass them as shared-memory handles)."""
    return picture if picture.latents is None else replace(picture,
                                                           latents=picture.latents.numpy())


def _torch(picture: Picture) -> Picture:
    if isinstance(picture.latents, np.ndarray):
        return replace(picture, latents=torch.from_numpy(picture.latents))
    return picture


def serve(device: str, threads: int, conn: Connection) -> None:
    """A worker process once its imports are done: the run's Setup, then tasks in,
    outcomes (and step counts) out, until told to stop."""
    import_model_classes()  # before the Setup comes: the driver is still preparing the run
    if (setup := _receive(conn)) is None:
        return
    if threads:
        torch.set_num_threads(threads)
    worker = Worker(setup, bind(device))
    while (task := _receive(conn)) is not None:
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


def bind(device: str) -> torch.device:
    """The worker's device, made its process's current CUDA device: whatever asks torch for
    "the" GPU (an empty_cache, a library's stream or handle) then means this one, and no
    worker opens a context on cuda:0 besides its own."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is not None:  # "cuda": the current one already
        torch.cuda.set_device(chosen)
    return chosen


def _receive(conn: Connection):
    """The driver's next message; None (stop) when it is gone too."""
    try:
        return conn.recv()
    except (EOFError, ConnectionResetError):
        return None


class ProcessPool:
    def __init__(self, setup: Setup, devices: list[str], threads: int,
                 on_step: StepCallback | None = None,
                 started: list[processes.Started] | None = None):
        """``started``: the workers the command line started early (processes.early), one
        per device in order; otherwise they are started now."""
        self.setup, self.devices, self.on_step = setup, devices, on_step
        self.threads = processes.worker_threads(threads, devices)
        self.workers = list(range(len(devices)))
        self._procs: dict[int, processes.Started] = {}
        self._holds: dict[int, str | None] = {}
        self._busy: set[int] = set()
        self.restarts = 0
        if started and [s.device for s in started] == devices:
            for w, s in enumerate(started):
                self._give_setup(w, s)
        else:
            for w in self.workers:
                self._start(w)

    def _start(self, w: int) -> None:
        self._give_setup(w, processes.start(self.devices[w], self.threads,
                                            f"sdbatch-worker-{w}"))

    def _give_setup(self, w: int, started: processes.Started) -> None:
        self._procs[w], self._holds[w] = started, None
        try:
            started.conn.send(self.setup)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died already: wait() finds it when it is given work

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._procs.values()]

    def holds(self, worker: int) -> str | None:
        return self._holds[worker]

    def submit(self, worker: int, task: Task) -> None:
        inputs = {k: None if v is None else _plain(v) for k, v in task.inputs.items()}
        self._busy.add(worker)
        try:
            self._procs[worker].conn.send(replace(task, inputs=inputs))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # it died idle: wait() finds it

    def wait(self) -> list[Done | Died]:
        events: list[Done | Died] = []
        while not events:
            by_conn = {self._procs[w].conn: w for w in self._busy}
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
        proc = self._procs[w].process
        proc.join(timeout=5)
        why = f"worker {w} on {self.devices[w]} ended with exit code {proc.exitcode}"
        self._procs[w].conn.close()
        self._busy.discard(w)
        self.restarts += 1
        self._start(w)
        return Died(w, why)

    def close(self) -> None:
        for s in self._procs.values():
            try:
                s.conn.send(None)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        for s in self._procs.values():
            s.process.join(timeout=10)
            s.kill()


def _outcome(outcome: Outcome) -> Outcome:
    if outcome.pictures is None:
        return outcome
    return replace(outcome, pictures=[_torch(p) for p in outcome.pictures])
