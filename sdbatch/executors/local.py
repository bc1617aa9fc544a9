"""The local executor: one worker in the run's own process, on one device; the driver
hands it the plan's batches in order."""

from __future__ import annotations

from sdbatch.executors.driver import Done
from sdbatch.executors.worker import StepCallback, Task, Worker


class LocalPool:
    def __init__(self, worker: Worker, on_step: StepCallback | None = None):
        self.worker = worker
        self.on_step = on_step
        self.workers = [0]
        self._task: Task | None = None

    def holds(self, worker: int) -> str | None:
        return self.worker.holds

    def submit(self, worker: int, task: Task) -> None:
        self._task = task

    def wait(self) -> list[Done]:
        task, self._task = self._task, None
        return [Done(0, self.worker.run(task, self.on_step))]

    def close(self) -> None:
        self.worker.release()
