"""Executors take a plan's batches to devices: a driver (driver.py) hands batches to a pool
of workers (worker.py): one in this process (local.py), one process per device
(multi.py), Ray actors (ray_actors.py); SLURM arrays run the local executor per shard.

This package's own modules import no model code (torch, diffusers) at their top, so the
command line can start multi's workers (processes.py) before it imports that code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdbatch.executors.processes import Started, devices, worker_threads
from sdbatch.schema import Executor

if TYPE_CHECKING:
    import torch

    from sdbatch.executors.driver import Pool
    from sdbatch.executors.worker import Setup, StepCallback


class PoolError(RuntimeError):
    """The workers cannot start (Ray missing, a cluster without the GPUs asked for)."""


def spec_device(executor: Executor) -> str:
    """The device the model stacks are specified for (it picks the dtype, and its type goes
    into every content key): multi's devices share one type (checked up front)."""
    if executor.name == "multi":
        found = devices(executor)
        return found[0] if found else "cuda"
    return executor.device


def device_problem(executor: Executor, dtype: str = "auto") -> tuple[str, str] | None:
    """(key, why) when the executor's devices cannot run here, or None: a name torch does
    not know (executor.device, executor.devices), multi with no GPU or with devices of two
    types, a ``model.dtype`` one of them cannot run (each of multi's GPUs is asked)."""
    import torch

    from sdbatch.models.stack import dtype_problem, pick_device

    key = "executor.devices" if executor.name == "multi" else "executor.device"
    found = devices(executor) if executor.name == "multi" else [
        d for d in (executor.device,) if d != "auto"]
    if executor.name == "multi" and not found:
        return key, ("executor=multi found no GPU; give the devices to run on, e.g. "
                     "'executor.devices=[cpu, cpu]'")
    try:
        kinds = {torch.device(d).type for d in found}
    except RuntimeError as e:
        return key, f"{e}; give torch device names such as cuda:0 or cpu"
    if len(kinds) > 1:
        return key, (f"executor.devices mixes {' and '.join(sorted(kinds))}: images would "
                     "differ by the device that drew them; give devices of one type")
    for name in found or [executor.device]:
        if why := dtype_problem(dtype, pick_device(name)):
            return "model.dtype", why
    return None


def open_pool(executor: Executor, setup: Setup, device: torch.device,
              on_step: StepCallback | None, run_id: str,
              started: list[Started] | None = None) -> Pool:
    """The run's workers; ``started``: multi's, started early by the command line."""
    if executor.name == "multi":
        from sdbatch.executors.multi import ProcessPool

        return ProcessPool(setup, devices(executor), executor.threads, on_step, started)
    if executor.name == "ray":
        from sdbatch.executors.ray_actors import RayPool

        return RayPool(setup, executor, run_id)
    from sdbatch.executors.local import LocalPool
    from sdbatch.executors.worker import Worker

    return LocalPool(Worker(setup, device), on_step)


def session_record(executor: Executor) -> dict:
    """What run.json's session says of the executor: its name, its workers' devices and
    threads (CPU kernels sum in another order on another thread count)."""
    if executor.name == "multi":
        import torch

        found = devices(executor)
        return {"executor": "multi", "devices": found,
                "threads": worker_threads(executor.threads, found)
                or torch.get_num_threads()}
    if executor.name == "ray":
        return {"executor": "ray", "address": executor.address or "local",
                "threads": executor.threads or max(1, int(executor.num_cpus))}
    return {"executor": executor.name}
