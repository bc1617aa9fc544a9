"""The driver: hands the plan's batches to a pool of workers and takes their results back,
the same loop for every executor (local, multi, ray).

A batch is handed out once its inputs are made, to an idle worker, preferring (in this
order) a batch whose stack the worker holds and whose inputs it made, one whose stack it
holds, one that needs no stack, one whose stack no other worker holds, then the first
ready: a worker keeps getting work for the stack it has loaded, and a later stage goes
where its input already is. With one worker this is the plan's order.

The driver is the only writer of the run folder: outputs that later calls take are kept
in ``store`` (memory and the run folder's disk copy) and control maps are made once, here.
A batch whose input failed fails too, with the reason. A worker that dies (killed, out of
host memory) is restarted and its batch handed out again; a batch that kills
``DEATHS_TO_FAIL`` workers is failed with that as its error, and the run goes on.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sdbatch.executors.intermediates import ControlMaps, Intermediates
from sdbatch.executors.worker import Outcome, Task
from sdbatch.plan import Batch
from sdbatch.stages.picture import Picture

DEATHS_TO_FAIL = 2


@dataclass
class BatchResult:
    batch: Batch
    pictures: list[Picture] | None  # one per call of the batch
    error: str | None
    seconds: float
    retries: tuple[str, ...] = ()  # what running out of memory took: "split", "vae_tiling"
    restarts: int = 0  # workers that died running this batch before it was done
    machine: dict | None = None  # where the worker drew it: device, name, torch threads


@dataclass(frozen=True)
class Done:
    worker: int
    outcome: Outcome


@dataclass(frozen=True)
class Died:
    worker: int
    why: str


class Pool(Protocol):
    """Workers the driver hands tasks to, one task per worker at a time."""

    workers: list[int]

    def holds(self, worker: int) -> str | None: ...  # the stack identity it has loaded

    def submit(self, worker: int, task: Task) -> None: ...

    def wait(self) -> list[Done | Died]: ...  # blocks until at least one event

    def close(self) -> None: ...


@dataclass
class _State:
    pending: list[Batch]
    produced: set[str]
    made: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    busy: dict[int, Batch] = field(default_factory=dict)
    sent: dict[int, float] = field(default_factory=dict)
    on_worker: dict[int, set[str]] = field(default_factory=dict)  # outputs a worker keeps
    made_by: dict[str, int] = field(default_factory=dict)
    deaths: Counter = field(default_factory=Counter)

    def ready(self, batch: Batch) -> bool:
        return all(c.input_key is None or c.input_key in self.made
                   or c.input_key not in self.produced for c in batch.calls)


def pick(ready: list[Batch], worker: int, holds: Callable[[int], str | None],
         others: list[int], made_by: dict[str, int]) -> Batch | None:
    """The batch an idle worker gets (see the module's docstring), or None."""
    if not ready:
        return None
    mine = holds(worker)
    held = {holds(w) for w in others}

    def rank(batch: Batch) -> int:
        stack = batch.calls[0].stack
        if stack and stack == mine:
            inputs = [made_by.get(c.input_key) for c in batch.calls if c.input_key]
            return 0 if inputs and all(w == worker for w in inputs) else 1
        if not stack:
            return 2
        return 3 if stack not in held else 4

    return min(ready, key=rank)  # min keeps the plan's order among equals


def drive(batches: Iterable[Batch], pool: Pool, store: Intermediates | None, maps: ControlMaps,
          should_stop: Callable[[], bool] = lambda: False,
          on_start: Callable[[Batch], None] | None = None) -> Iterator[BatchResult]:
    """Render ``batches`` on ``pool``; results come in the order batches finish. After
    ``should_stop`` the batches in flight finish and nothing more is handed out.
    ``on_start`` hears of each batch handed out (the progress bar shows its stage)."""
    pending = list(batches)
    state = _State(pending, {c.key for b in pending for c in b.calls},
                   on_worker={w: set() for w in pool.workers})
    consumers = waiting_for(pending)
    forget: dict[int, list[str]] = {w: [] for w in pool.workers}
    while state.pending or state.busy:
        for lost in _fail_lost(state):
            _ended(lost.batch, state, store, consumers, forget)
            yield lost
        if not should_stop():
            for worker in pool.workers:
                if worker in state.busy:
                    continue
                ready = [b for b in state.pending if state.ready(b)]
                batch = pick(ready, worker, pool.holds,
                             [w for w in pool.workers if w != worker], state.made_by)
                if batch is None:
                    break
                state.pending.remove(batch)
                pool.submit(worker, _task(batch, worker, state, store, consumers, maps,
                                          forget))
                state.busy[worker] = batch
                state.sent[worker] = time.perf_counter()
                if on_start:
                    on_start(batch)
        if not state.busy:
            if state.pending and not should_stop():
                raise RuntimeError("the plan has batches whose inputs are never made")
            return
        for event in pool.wait():
            batch = state.busy.pop(event.worker)
            if isinstance(event, Died):
                state.on_worker[event.worker] = set()
                forget[event.worker] = []
                state.made_by = {k: w for k, w in state.made_by.items() if w != event.worker}
                state.deaths[id(batch)] += 1
                if state.deaths[id(batch)] < DEATHS_TO_FAIL:
                    state.pending.insert(0, batch)
                    continue
                error = f"its worker died {DEATHS_TO_FAIL} times rendering it ({event.why})"
                state.failed.update({c.key: error for c in batch.calls})
                _ended(batch, state, store, consumers, forget)
                yield BatchResult(batch, None, error, time.perf_counter()
                                  - state.sent[event.worker], restarts=DEATHS_TO_FAIL)
                continue
            yield _finish(batch, event, state, store, consumers, forget)


def _fail_lost(state: _State) -> Iterator[BatchResult]:
    """Every pending batch whose input failed fails with that reason (and so on down)."""
    again = True
    while again:
        again = False
        for batch in list(state.pending):
            lost = [state.failed[c.input_key] for c in batch.calls
                    if c.input_key in state.failed]
            if lost:
                error = f"its input failed: {lost[0].splitlines()[0]}"
                state.failed.update({c.key: error for c in batch.calls})
                state.pending.remove(batch)
                again = True
                yield BatchResult(batch, None, error, 0.0)


def _task(batch: Batch, worker: int, state: _State, store: Intermediates | None,
          consumers: dict[str, int], maps: ControlMaps, forget: dict[int, list[str]]) -> Task:
    """The batch with what the worker lacks: inputs it does not keep, control maps."""
    kept = state.on_worker[worker]
    inputs = {c.input_key: None if c.input_key in kept else store.get(c.input_key)
              for c in batch.calls if c.input_key is not None}
    units = {u["map"]: u for u in batch.calls[0].params.get("controlnet", ())}
    keep = tuple(c.key for c in batch.calls if consumers.get(c.key))
    kept.update(keep)
    gone, forget[worker] = tuple(forget[worker]), []
    kept.difference_update(gone)
    return Task(batch, inputs, {key: maps.get(u) for key, u in units.items()}, keep, gone)


def _finish(batch: Batch, event: Done, state: _State, store: Intermediates | None,
            consumers: dict[str, int], forget: dict[int, list[str]]) -> BatchResult:
    outcome = event.outcome
    restarts = state.deaths.pop(id(batch), 0)
    if outcome.error is not None:
        state.failed.update({c.key: outcome.error for c in batch.calls})
        _ended(batch, state, store, consumers, forget)
        return BatchResult(batch, None, outcome.error, outcome.seconds, outcome.retries,
                           restarts)
    for call, picture in zip(batch.calls, outcome.pictures, strict=True):
        state.made.add(call.key)
        if consumers.get(call.key) and store is not None:
            store.put(call.key, picture)
            state.made_by[call.key] = event.worker
    _ended(batch, state, store, consumers, forget)
    return BatchResult(batch, outcome.pictures, None, outcome.seconds, outcome.retries,
                       restarts, outcome.machine)


def waiting_for(batches: list[Batch]) -> dict[str, int]:
    """How many of these calls take each output as their input: an output is kept (in the
    store, in the worker that made it) until every one of them has ended."""
    return dict(Counter(c.input_key for b in batches for c in b.calls
                        if c.input_key is not None))


def _ended(batch: Batch, state: _State, store: Intermediates | None,
           consumers: dict[str, int], forget: dict[int, list[str]]) -> None:
    """The batch's calls ended (made, failed or lost): an input no call waits for any more
    is let go, in the store and in the worker that keeps it."""
    for call in batch.calls:
        key = call.input_key
        if key is None or key not in consumers:
            continue
        consumers[key] -= 1
        if consumers[key] <= 0:
            if store is not None:
                store.release(key)
            holder = state.made_by.pop(key, None)
            if holder is not None and key in state.on_worker[holder]:
                forget[holder].append(key)
