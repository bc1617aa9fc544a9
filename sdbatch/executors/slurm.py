"""executor=slurm: the matrix split into shards, one SLURM array task per shard (submitit).

The driver (the `python -m sdbatch ... executor=slurm` process) does every up-front check,
makes the run folder, names the submission allowed into it (lock.sanction), shards what is
still to render and submits the array; each task runs the local executor on its shard's
images into the same run folder on the shared file system, skipping what is done. The
driver then waits, showing progress from the manifest, and prints a summary; Ctrl-C leaves
the array running and says how to watch it and how to finish the run.

Images whose chains share a stage call (one base image under several hires variants) go to
one shard, so no call is computed twice, and so do images whose calls share a batch of the
whole run's plan: each task runs the run's own batches, and an image's bytes, which may move
by a level with the batch it is rendered in, do not depend on the sharding. The groups are
placed largest first on the lightest shard.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from sdbatch import schema
from sdbatch.inputs import command_arg
from sdbatch.plan import Plan, StageCall
from sdbatch.reports import gallery

LOGS = "slurm"  # submitit's folder in the run folder: its pickles and each task's logs
POLL_S = 5.0


def cost(call: StageCall) -> int:
    """A call's work, roughly: its output's pixels times its steps (a model-free step, such
    as an Extras upscale or a loaded image, counts one step)."""
    p = call.params
    w, h = p.get("output_size") or (p.get("width") or 1, p.get("height") or 1)
    return max(1, w * h) * max(1, int(p.get("steps") or 1))


def shard(plan: Plan, indices: Iterable[int], n: int) -> list[list[int]]:
    """``indices`` (images of ``plan``) in at most ``n`` shards, each sorted: images whose
    chains share a call key or whose calls share a batch in one shard, the groups balanced
    by the cost of their distinct calls (largest first, onto the lightest shard; ties to the
    lower shard). No empty shard."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}  # call key -> the first image whose chain has it
    for index in sorted(indices):
        parent[index] = index
        for call in plan.chains[index]:
            other = first.setdefault(call.key, index)
            a, b = root(other), root(index)
            if a != b:
                parent[max(a, b)] = min(a, b)
    for batch in plan.batches:
        users = [first[c.key] for c in batch.calls if c.key in first]
        for other in users[1:]:
            a, b = root(users[0]), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for index in sorted(parent):
        groups.setdefault(root(index), []).append(index)
    work = {g: sum(cost(c) for c in {c.key: c for i in members for c in plan.chains[i]}
                                    .values())
            for g, members in groups.items()}
    loads = [0] * max(1, n)
    parts: list[list[int]] = [[] for _ in loads]
    for g in sorted(groups, key=lambda g: (-work[g], g)):
        k = min(range(len(loads)), key=lambda k: (loads[k], k))
        loads[k] += work[g]
        parts[k] += groups[g]
    return sorted((sorted(p) for p in parts if p), key=lambda p: p[0])


def restrict(plan: Plan, indices: frozenset[int]) -> Plan:
    """The plan of a shard's images: their chains, and the run's batches that make their
    calls (whole: see shard)."""
    chains = {i: c for i, c in plan.chains.items() if i in indices}
    keys = {c.key for chain in chains.values() for c in chain}
    return Plan(chains, tuple(b for b in plan.batches if any(c.key in keys for c in b.calls)))


def task_device(executor: schema.Executor) -> str:
    """The device the tasks render on, as the driver records it for a resume to compare:
    `auto` means cuda when a task gets GPUs on a cluster, else this machine's choice."""
    if executor.device != "auto" or executor.cluster == "local":
        return executor.device
    return "cuda" if executor.gpus_per_task > 0 else "cpu"


class ShardTask:
    """What one array task runs: the local executor on its shard. Checkpointable: when SLURM
    signals a time-out or pre-emption, submitit requeues the task, which then skips what its
    earlier run wrote."""

    def __call__(self, job: dict, submission: str, number: int, indices: list[int]) -> int:
        from sdbatch import run

        label = f"{job['run']['dir']}/config.yaml"
        valid = schema.validate(job, lambda key: label)
        return run.run(valid, lambda key: label, [], sys.argv,
                       run.Shard(submission, number, frozenset(indices)))

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _executor(job: schema.Job, folder: Path):
    import submitit

    e = job.executor
    executor = submitit.AutoExecutor(folder=folder, cluster=e.cluster)
    executor.update_parameters(name=f"sdbatch-{job.job.name}", timeout_min=e.timeout_min,
                               gpus_per_node=e.gpus_per_task, cpus_per_task=e.cpus_per_task,
                               mem_gb=e.mem_gb, tasks_per_node=1, nodes=1)
    if e.partition and e.cluster == "slurm":
        executor.update_parameters(slurm_partition=e.partition)
    return executor


def submit(job: schema.Job, origin: schema.Origin, overrides: list[str],
           argv: list[str]) -> int:
    """The driver: checks, run folder, array, then waiting (see the module)."""
    try:
        import submitit  # noqa: F401 - an optional extra: missing, say so before any work
    except ImportError:
        raise schema.JobError([schema.Problem(
            "executor.name", "executor=slurm needs submitit: pip install 'sdbatch[slurm]' "
            "(or pip install submitit)", origin("executor.name"))]) from None
    from sdbatch import run
    from sdbatch.output.lock import RunFolderBusy, RunLock, sanction
    from sdbatch.output.run_folder import RunFolder, now

    job = dataclasses.replace(job, executor=dataclasses.replace(
        job.executor, device=task_device(job.executor)))
    p = run.prepare(job, origin)
    lock = RunLock(p.path, now())
    try:
        lock.acquire()
    except RunFolderBusy as e:
        raise schema.JobError([schema.Problem("run.dir", str(e), origin("run.dir"))]) from None
    try:
        run.check_still_fresh(p, origin)
        folder = (RunFolder.create(p.path, schema.to_dict(p.normal), overrides, p.nonce,
                                   len(p.renders), p.made_of)
                  if p.fresh else RunFolder(p.path))
        done = {r.index for r in p.renders if folder.is_done(r.index, p.keys[r.index])}
        parts = shard(p.plan, (r.index for r in p.renders if r.index not in done),
                      job.executor.shards)
        submission = secrets.token_hex(6)
        sanction(p.path, submission, len(parts))
        folder.add_session({"started": now(), "submission": submission, "argv": argv,
                            "cluster": job.executor.cluster, "shards": len(parts),
                            "status": "submitted"}, ("started", "status"))
    finally:
        lock.release()
    total = len(p.renders)
    print(f"{job.job.name}: {total} image{'s' if total != 1 else ''} "
          f"({run.describe(p.resolved)}) -> {p.path}")
    if done:
        print(f"  resuming: {len(done)} already there, {total - len(done)} to render")
    if not parts:
        return _finish(job, p, folder, done, [])
    normal = schema.to_dict(p.normal)  # files as found: a task has no job file beside it
    task = {**normal, "run": {**normal["run"], "dir": str(p.path.resolve()),
                              "progress": "quiet"}}
    executor = _executor(job, p.path / LOGS)
    with executor.batch():
        jobs = [executor.submit(ShardTask(), task, submission, k, indices)
                for k, indices in enumerate(parts)]
    array = str(jobs[0].job_id).split("_")[0]
    folder.update_session({"array": array}, top=False)
    print(f"  submitted {len(parts)} array task{'s' if len(parts) != 1 else ''} "
          f"({job.executor.cluster} job {array}); task logs in {p.path / LOGS}")
    try:
        _wait(job, p, jobs, len(done))
    except KeyboardInterrupt:
        watch = (f"squeue -j {array}" if job.executor.cluster == "slurm"
                 else f"the task logs in {p.path / LOGS}")
        print(f"\nstopped waiting; the array goes on (watch it: {watch}"
              + (f"; cancel it: scancel {array}" if job.executor.cluster == "slurm" else "")
              + f"). When it has ended: sdbatch resume {command_arg(p.path)} finishes what "
              "is left")
        return run.EXIT_INTERRUPTED
    return _finish(job, p, folder, done, list(zip(parts, jobs, strict=True)))


def _counts(p, entries: dict) -> tuple[int, int]:
    """(images there with this run's key, images failed) per the manifest."""
    ok = sum(1 for r in p.renders if entries.get(r.index, {}).get("status") == "ok"
             and entries[r.index].get("key") in p.keys[r.index])
    failed = sum(1 for r in p.renders if entries.get(r.index, {}).get("status") == "failed")
    return ok, failed


def _wait(job: schema.Job, p, jobs: list, done: int) -> None:
    from sdbatch.output.run_folder import RunFolder
    from sdbatch.progress import Progress

    progress = Progress(job.run.progress, len(p.renders), done)
    shown = done
    try:
        while True:
            finished = all(j.done() for j in jobs)
            ok, failed = _counts(p, RunFolder.stored_entries(p.path))
            if ok + failed > shown:
                progress.advance(ok + failed - shown)
                shown = ok + failed
            if finished:
                return
            time.sleep(POLL_S)
    finally:
        progress.close()


def _finish(job: schema.Job, p, folder, done: set[int], tasks: list) -> int:
    """The summary, once every task has ended; the run's status in run.json."""
    from sdbatch import run
    from sdbatch.executors.intermediates import Intermediates
    from sdbatch.output.lock import RunFolderBusy, RunLock
    from sdbatch.output.run_folder import RunFolder, now

    for indices, j in tasks:
        error = j.exception()
        if error is not None:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            print(f"  shard {indices[0]:05d}..{indices[-1]:05d} ({len(indices)} images): "
                  f"its task failed: {reason} (log: {j.paths.stderr})")
    ok, failed = _counts(p, RunFolder.stored_entries(p.path))
    total = len(p.renders)
    status = "complete" if ok == total else "failed" if ok + failed == total else "interrupted"
    counts = {"rendered": ok - len(done), "skipped": len(done), "failed": failed}
    try:
        with RunLock(p.path, now()):
            folder.update_session({"ended": now(), "status": status, "counts": counts})
            if status == "complete" and not job.run.keep_intermediates:
                Intermediates(p.path, 0).remove_all()
            sheets = run.write_grids(p.path)
            gallery.write(p.path)
    except RunFolderBusy as e:
        sheets = []
        print(f"  note: run.json not updated: {e}")
    print(f"{status}: {counts['rendered']} rendered, {counts['skipped']} already there, "
          f"{failed} failed -> {p.path}")
    if sheets:
        print(f"  grids: {', '.join(str(s.relative_to(p.path)) for s in sheets)}")
    print(f"  gallery: {p.path / gallery.FILE}")
    if status != "complete":
        print(f"  to finish the run: sdbatch resume {command_arg(p.path)} (a new array), or "
              f"sdbatch resume {command_arg(p.path)} --executor local (on this machine)")
    return {"complete": run.EXIT_OK, "failed": run.EXIT_FAILURES}.get(status,
                                                                       run.EXIT_INTERRUPTED)
