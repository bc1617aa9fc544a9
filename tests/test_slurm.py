"""executor=slurm: the matrix sharded into one array task per shard (submitit's local
executor stands in for SLURM), every task writing into one run folder: the same bytes as a
local run, no manifest line lost or doubled, a failed task's work finished by a resume."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdbatch import matrix
from sdbatch.executors.slurm import cost, shard
from sdbatch.output import manifest
from sdbatch.output.lock import (
    OtherSubmission,
    RunFolderBusy,
    RunLock,
    sanction,
)
from sdbatch.plan import make_plan
from sdbatch.schema import validate
from tests.conftest import REPO, SMALL_JOB, sdbatch, write_job

BATCHED = "params.batch_size=2"  # 8 images
PASSES = "executor.max_batch=2"  # 2 to a pass: shards keep the run's passes
ARRAY = [BATCHED, PASSES, "executor=slurm", "executor.cluster=local", "executor.shards=2",
         "executor.gpus_per_task=0"]


def plan_of(raw, batch_size=2):
    job = validate(raw)
    renders = matrix.expand(matrix.resolve_seeds(job, 0))
    return make_plan(renders, {"tiny": "stack-a"}, batch_size)


def test_images_sharing_a_base_stay_in_one_shard_and_shards_balance_work():
    """Two prompts x two seeds, each base under three hires variants: the 4 bases' 12
    images make 4 groups of 3, and 2 shards take 2 groups each; with 2 calls to a forward
    pass, the images of each batch of the run's plan stay together too."""
    job = {"prompt": ["a", "b"], "params": {"seed": [1, 2], "width": 64, "height": 64,
                                            "steps": 4},
           "post": [{"hires_fix": {"scale": 2, "steps": 3, "denoise": [0.3, 0.5, 0.7]}}]}
    plan = plan_of(job, batch_size=1)
    parts = shard(plan, plan.chains, 2)
    assert sorted(i for p in parts for i in p) == sorted(plan.chains)
    base = {i: plan.chains[i][0].key for i in plan.chains}
    for p in parts:  # a base drawn in one shard only
        assert not {base[i] for i in p} & {base[i] for q in parts if q is not p for i in q}
    assert [len(p) for p in parts] == [6, 6]
    assert len(shard(plan, plan.chains, 10)) == 4  # never an empty shard
    plan = plan_of(job, batch_size=2)
    parts = shard(plan, plan.chains, 4)
    assert sorted(i for p in parts for i in p) == sorted(plan.chains)
    for p in parts:  # each batch of the run's plan in one shard
        for batch in plan.batches:
            users = {i for i in plan.chains for c in plan.chains[i] if c in batch.calls}
            assert users <= set(p) or not users & set(p)


def test_shards_balance_by_cost_not_count():
    """One big image against four small ones: 2 shards split 1 / 4."""
    plan = plan_of({"prompt": "a", "params": {"seed": [1, 2, 3, 4, 5], "steps": 4,
                                              "width": [64, 64, 64, 64, 256],
                                              "height": [64, 64, 64, 64, 256]},
                    "zip": [["params.seed", "params.width", "params.height"]]})
    assert cost(plan.chains[4][0]) == 16 * cost(plan.chains[0][0])
    assert shard(plan, plan.chains, 2) == [[0, 1, 2, 3], [4]]


def _append(path: str, worker: int, n: int) -> None:
    m = manifest.Manifest(Path(path))
    for i in range(n):
        m.append({"index": worker * 1000 + i, "pad": "x" * 3000})


def test_concurrent_manifest_appends_lose_nothing(tmp_path: Path):
    """Two processes appending 200 long lines each (longer than one write of a pipe): every
    line is there, whole, once, and compactions meanwhile lose none."""
    path = tmp_path / "manifest.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(str(path), w, 200)) for w in (1, 2)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):  # a compaction (a task's end) meanwhile
        manifest.Manifest(path).compact()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    indices = [json.loads(line)["index"] for line in lines[:-1]]
    assert sorted(indices) == sorted([1000 + i for i in range(200)] +
                                     [2000 + i for i in range(200)])


def test_the_shard_lock_admits_one_submission_and_refuses_strangers(tmp_path: Path):
    folder = tmp_path / "run"
    with RunLock(folder, "t0"):
        sanction(folder, "sub-a", 2)
    with RunLock(folder, "t1", ("sub-a", 0)), RunLock(folder, "t1", ("sub-a", 1)):
        with pytest.raises(RunFolderBusy, match="shard 0 of submission sub-a"):
            RunLock(folder, "t2", ("sub-a", 0)).acquire()  # a second copy of shard 0
        with pytest.raises(RunFolderBusy, match="shard . of submission sub-a"):
            RunLock(folder, "t2").acquire()  # a process of no submission
    with pytest.raises(OtherSubmission, match="not to sub-old"):
        RunLock(folder, "t3", ("sub-old", 0)).acquire()
    with RunLock(folder, "t4"):  # the array is over: the folder is free again
        with pytest.raises(RunFolderBusy):
            RunLock(folder, "t4", ("sub-a", 0)).acquire()


def _images(run: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((run / "images").glob("*.png"))}


def _manifest_indices(run: Path) -> list[int]:
    return [json.loads(line)["index"] for line in
            (run / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict[str, str]:
    cwd = tmp_path_factory.mktemp("local")
    write_job(cwd, "small", SMALL_JOB)
    sdbatch(cwd, "+job=small", "run.dir=local", BATCHED, PASSES)
    return _images(cwd / "local")


def test_slurm_without_submitit_is_refused_with_the_extra_to_install(tmp_path: Path,
                                                                    monkeypatch):
    from sdbatch.executors import slurm
    from sdbatch.schema import JobError

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    job = validate({"prompt": "a red house", "executor": {"name": "slurm"},
                    "run": {"dir": str(tmp_path / "run")}})
    with pytest.raises(JobError, match=r"executor\.name .*pip install 'sdbatch\[slurm\]'"):
        slurm.submit(job, lambda key: "the test", [], [])
    assert not (tmp_path / "run").exists()


def test_an_array_of_two_shards_makes_the_local_run_bytes(tmp_path: Path, local_run):
    write_job(tmp_path, "small", SMALL_JOB)
    out = sdbatch(tmp_path, "+job=small", "run.dir=run", *ARRAY).stdout
    run = tmp_path / "run"
    assert "submitted 2 array tasks" in out and "complete: 8 rendered" in out
    assert _images(run) == local_run
    assert sorted(_manifest_indices(run)) == list(range(8))
    info = json.loads((run / "run.json").read_text())
    tasks = [s for s in info["sessions"] if "shard" in s]
    assert sorted(s["shard"] for s in tasks) == [0, 1]
    assert sum(s["counts"]["rendered"] for s in tasks) == 8  # no image rendered twice
    assert info["status"] == "complete" and info["counts"]["rendered"] == 8
    assert not (run / "intermediates").exists()
    assert list((run / "slurm").glob("*_log.err"))


def _task_pids(logs: Path) -> list[int]:
    """The processes of the array's tasks (submitit's local executor runs each as
    `python -m submitit.core._submit FOLDER`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and str(logs).encode() in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds tasks in /proc")
def test_a_killed_task_leaves_a_run_that_resume_finishes(tmp_path: Path, local_run):
    """One task is killed (kill -9, as a node lost) before it renders; the driver names it,
    exits non-zero and says how to finish; a resume on this machine finishes the run."""
    write_job(tmp_path, "small", SMALL_JOB)
    run = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "sdbatch", "+job=small", "run.dir=run",
                               *ARRAY], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not (pids := _task_pids(run.resolve() / "slurm")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(pids[0], signal.SIGKILL)
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 130, out
    assert "its task failed" in out and "sdbatch resume run" in out
    first = _manifest_indices(run)
    assert len(first) == 4
    assert not subprocess.run([sys.executable, "-m", "sdbatch", "resume", "run"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    assert _images(run) == local_run
    assert sorted(_manifest_indices(run)) == list(range(8))


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2") or not Path("/proc/self/cmdline").exists(),
                    reason="signals tasks found in /proc")
def test_a_task_warned_of_its_time_limit_is_requeued_and_goes_on(tmp_path: Path):
    """SLURM warns a task before its time limit (submitit asks for USR2): the task keeps
    what it wrote, submitit requeues it, and its next run renders only what is left."""
    write_job(tmp_path, "small", SMALL_JOB)
    run = tmp_path / "run"
    sixteen = ["params.batch_size=4", *(a for a in ARRAY if a != BATCHED)]  # 2 shards of 8
    driver = subprocess.Popen([sys.executable, "-m", "sdbatch", "+job=small", "run.dir=run",
                               *sixteen], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def started_shards() -> int:  # sessions begin after submitit's signal handlers are set
        try:
            info = json.loads((run / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return 0
        return sum(1 for s in info.get("sessions", []) if "shard" in s)

    deadline = time.monotonic() + 120
    while (started_shards() < 2 or not (run / "manifest.jsonl").exists()
           or not (run / "manifest.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _task_pids(run.resolve() / "slurm"):
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:  # that task had finished
            pass
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0 and "complete: 16 rendered" in out, out
    assert sorted(_manifest_indices(run)) == list(range(16))  # none lost, none twice
    logs = "".join(f.read_text() for f in (run / "slurm").glob("*_log.*"))
    assert "Requeued job" in logs
    sessions = [s for s in json.loads((run / "run.json").read_text())["sessions"]
                if "shard" in s]
    warned = [s for s in sessions if s["status"] == "interrupted"]
    again = [s for s in sessions if s["status"] == "complete" and s["counts"]["skipped"]]
    assert warned and again  # the requeued run found what the warned one had written
    assert {s["shard"] for s in again} <= {s["shard"] for s in warned}


def test_a_submission_racing_another_for_a_new_folder_is_refused(tmp_path: Path, monkeypatch):
    """Two submissions to one new run.dir: the one that takes the lock second finds the
    other's run.json and stops, rather than making the folder again under that array."""
    from sdbatch.executors import slurm
    from sdbatch.schema import JobError

    run = tmp_path / "run"
    real = RunLock.acquire

    def other_first(self):
        run.mkdir(exist_ok=True)
        (run / "run.json").write_text('{"made": "by the other submission"}')
        real(self)

    monkeypatch.setattr(RunLock, "acquire", other_first)
    job = validate({"prompt": "a red house", "executor": {"name": "slurm", "cluster": "local"},
                    "run": {"dir": str(run)}})
    with pytest.raises(JobError, match=r"run\.dir .*another process made .* a moment ago"):
        slurm.submit(job, lambda key: "the test", [], [])
    assert json.loads((run / "run.json").read_text()) == {"made": "by the other submission"}
