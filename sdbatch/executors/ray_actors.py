"""executor=ray: long-lived Ray actors (``num_gpus`` GPUs and ``num_cpus`` CPUs each) on an
existing cluster (``address``: auto, ray://host:port) or on a local one started for the
run, fed by the same driver as every executor (stack affinity included).

Pictures come back to the driver through Ray's object store; with ``shared_dir`` (a folder
every actor and the driver see) an actor writes them there instead (the intermediates'
lossless format) and hands back their names, so large pictures do not travel through the
object store. The driver writes the run folder either way, so the manifest is the same.
An actor that dies is replaced and its batch handed out again.
"""

from __future__ import annotations

import math
import signal
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from sdbatch.executors import PoolError
from sdbatch.executors.driver import Died, Done
from sdbatch.executors.intermediates import Intermediates
from sdbatch.executors.worker import Outcome, Setup, Task, Worker
from sdbatch.models.stack import StackLoadError, pick_device
from sdbatch.output.writer import WriteError
from sdbatch.schema import Executor


class RayWorker:
    """The actor: a Worker on the GPU Ray gave it (or the executor's device without one)."""

    def __init__(self, setup: Setup, device: str, threads: int, shared: str | None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda") if torch.cuda.is_available() and \
            device == "auto" else pick_device(device)
        self.worker = Worker(setup, self.device)
        self.shared = None if shared is None else Intermediates(Path(shared), 0, Path(shared))

    def run(self, task: Task) -> tuple[str, Outcome | str, str | None]:
        try:
            outcome = self.worker.run(task)
        except StackLoadError as e:
            return "fatal", str(e), None
        if self.shared is not None and outcome.pictures is not None:
            names = []
            try:
                for picture in outcome.pictures:
                    names.append(uuid.uuid4().hex)
                    self.shared.put(names[-1], picture)
            except WriteError as e:
                return "pool", f"executor.shared_dir: an actor {e}", None
            outcome = replace(outcome, pictures=names)
        return "done", outcome, self.worker.holds


def actor_count(executor: Executor, gpus: float) -> int:
    """executor.workers, or (0) one actor per num_gpus of the cluster's GPUs, at least one."""
    if executor.workers:
        return executor.workers
    return max(1, int(gpus // executor.num_gpus)) if executor.num_gpus else 1


class RayPool:
    def __init__(self, setup: Setup, executor: Executor, run_id: str):
        try:
            import ray
        except ImportError:
            raise PoolError("executor=ray needs Ray: pip install 'sdbatch[ray]' "
                            "(or pip install ray)") from None
        self.ray = ray
        self.actors: dict = {}
        self.shared = None
        self.started = not ray.is_initialized()
        if self.started:
            local = executor.address is None
            count = actor_count(executor, torch.cuda.device_count() if local else 0)
            kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                ray.init(address=executor.address, include_dashboard=False, log_to_driver=False,
                         **({"num_cpus": max(1, math.ceil(count * executor.num_cpus))}
                            if local else {}))
            except ConnectionError as e:
                raise PoolError(f"executor.address={executor.address}: no Ray cluster there "
                                f"({str(e).splitlines()[0]}); give the head's address, "
                                "auto on a cluster node, or leave it unset for a local "
                                "cluster") from None
            finally:  # Ray's SIGTERM handler exits at once: a run stops after its batches
                for s, handler in kept.items():
                    if handler is not None:  # None: not set from Python, nothing to put back
                        signal.signal(s, handler)
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if executor.num_gpus > gpus:
            self.close()
            raise PoolError(f"the Ray cluster has {gpus:g} GPUs and each actor asks for "
                            f"executor.num_gpus={executor.num_gpus:g}: give "
                            "executor.num_gpus=0 for CPU actors, or join a cluster with GPUs")
        count = actor_count(executor, gpus)
        cpus = resources.get("CPU", 0)
        if count * executor.num_cpus > cpus or count * executor.num_gpus > gpus:
            self.close()
            raise PoolError(f"{count} actors of executor.num_cpus={executor.num_cpus:g} and "
                            f"executor.num_gpus={executor.num_gpus:g} do not fit the Ray "
                            f"cluster's {cpus:g} CPUs and {gpus:g} GPUs (Ray would never "
                            "place the rest): lower executor.workers or the actors' share")
        self.actor_class = ray.remote(num_gpus=executor.num_gpus,
                                      num_cpus=executor.num_cpus)(RayWorker)
        if executor.shared_dir:
            self.shared = Path(executor.shared_dir) / f"sdbatch-{run_id}"
        threads = executor.threads or max(1, int(executor.num_cpus))
        self.args = (setup, executor.device, threads,
                     None if self.shared is None else str(self.shared))
        self.workers = list(range(count))
        self.actors = {w: self.actor_class.remote(*self.args) for w in self.workers}
        self._holds: dict[int, str | None] = dict.fromkeys(self.workers)
        self._inflight: dict = {}  # object ref -> worker
        self.restarts = 0

    def holds(self, worker: int) -> str | None:
        return self._holds[worker]

    def submit(self, worker: int, task: Task) -> None:
        self._inflight[self.actors[worker].run.remote(task)] = worker

    def wait(self) -> list[Done | Died]:
        ray = self.ray
        done, _ = ray.wait(list(self._inflight), num_returns=1)
        events: list[Done | Died] = []
        for ref in done:
            w = self._inflight.pop(ref)
            try:
                kind, outcome, holds = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                self.actors[w] = self.actor_class.remote(*self.args)
                self._holds[w] = None
                self.restarts += 1
                events.append(Died(w, f"Ray actor {w} died: {str(e).splitlines()[0]}"))
                continue
            if kind == "fatal":
                raise StackLoadError(outcome)
            if kind == "pool":
                raise PoolError(outcome)
            self._holds[w] = holds
            events.append(Done(w, self._fetch(outcome)))
        return events

    def _fetch(self, outcome: Outcome) -> Outcome:
        """Pictures an actor left in the shared folder, read and removed."""
        if self.shared is None or outcome.pictures is None:
            return outcome
        store = Intermediates(self.shared, 0, self.shared)
        try:
            pictures = [store.get(name) for name in outcome.pictures]
        except FileNotFoundError as e:
            raise PoolError(f"executor.shared_dir={self.shared.parent}: the driver does not "
                            f"see what the actors wrote there ({e}); give a folder the "
                            "driver and every node share, or leave it unset") from None
        for name in outcome.pictures:
            for suffix in (".png", ".safetensors"):
                (self.shared / f"{name}{suffix}").unlink(missing_ok=True)
        return replace(outcome, pictures=pictures)

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        if self.shared is not None:
            import shutil

            shutil.rmtree(self.shared, ignore_errors=True)
        if self.started:
            self.ray.shutdown()
