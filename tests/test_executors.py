"""Executors: the bytes of every image do not depend on the executor or its worker count;
workers that die, batches that run out of memory, images that keep failing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from sdbatch import run as runner
from sdbatch.executors import driver
from sdbatch.executors import worker as workers
from sdbatch.schema import validate

from .conftest import REPO, write_job

PLAIN = {"prompt": ["a red house", "a blue tower"], "negative_prompt": "blurry",
         "params": {"sampler": "Euler a", "steps": 3, "seed": [1, 2], "width": 64,
                    "height": 64}}
POST = {"prompt": "a red house on a lawn",
        "params": {"sampler": "Euler a", "steps": 3, "seed": [1, 2], "width": 64,
                   "height": 64},
        "post": [{"hires_fix": {"scale": 1.5, "denoise": [0.3, 0.6], "steps": 2}}]}
EXECUTORS = {
    "local": {"name": "local", "threads": 1},
    "multi": {"name": "multi", "devices": ["cpu", "cpu"], "threads": 1},
    "ray": {"name": "ray", "workers": 2, "num_gpus": 0, "num_cpus": 1, "threads": 1},
}


def run_job(raw: dict, folder: Path, executor: dict) -> int:
    raw = {**raw, "executor": executor, "run": {"dir": str(folder), "progress": "quiet"}}
    return runner.run(validate(raw), lambda key: "test", [], ["test"])


def entries(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def file_shas(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "images").iterdir())}


@pytest.mark.parametrize("job", [PLAIN, POST], ids=["txt2img", "post-steps"])
def test_the_bytes_of_every_image_do_not_depend_on_the_executor(tmp_path: Path, job):
    found = {}
    shared = tmp_path / "shared"  # with post-steps, Ray's actors hand pictures over a folder
    for name, executor in EXECUTORS.items():
        if name == "ray" and job is POST:
            executor = {**executor, "shared_dir": str(shared)}
        assert run_job(job, tmp_path / name, executor) == 0, name
        found[name] = file_shas(tmp_path / name)
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["executor"] == name
    assert len(found["local"]) == 4
    assert found["multi"] == found["local"] and found["ray"] == found["local"]
    assert not shared.exists() or not any(shared.iterdir())  # taken and cleared


def test_multi_refuses_devices_of_two_types_and_no_gpu_before_any_work(tmp_path: Path):
    from sdbatch.schema import JobError

    raw = {**PLAIN, "executor": {"name": "multi", "devices": ["cpu", "cuda:0"]},
           "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError, match="mixes cpu and cuda"):
        runner.run(validate(raw), lambda key: "test", [], ["test"])
    raw["executor"]["devices"] = ["gpu0", "gpu1"]
    with pytest.raises(JobError, match="executor.devices.*give torch device names"):
        runner.run(validate(raw), lambda key: "test", [], ["test"])
    raw["executor"] = {"device": "gpu"}
    with pytest.raises(JobError, match="executor.device.*give torch device names"):
        runner.run(validate(raw), lambda key: "test", [], ["test"])
    assert not (tmp_path / "r").exists()


def test_multi_workers_started_before_the_run_do_its_work_and_end_with_it(tmp_path: Path):
    """The command line starts multi's workers before it imports the model code
    (processes.early); the run's pool takes them, and they end with it. Workers a run never
    took (it stopped on a mistake first) are ended too."""
    from sdbatch.executors import processes
    from sdbatch.schema import JobError

    executor = validate({"executor": EXECUTORS["multi"]}).executor
    with processes.early(executor) as started:
        assert [s.device for s in started] == ["cpu", "cpu"]
        assert all(s.process.is_alive() for s in started)
        raw = {**PLAIN, "executor": EXECUTORS["multi"],
               "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
        assert runner.run(validate(raw), lambda key: "test", [], ["test"], started=started) == 0
        assert [s.process.exitcode for s in started] == [0, 0]  # stopped by the pool, not killed
    assert len(file_shas(tmp_path / "r")) == 4
    assert all(e["status"] == "ok" and "worker_restarts" not in e for e in entries(tmp_path / "r"))

    missing = {**raw, "model": {"checkpoint": str(tmp_path / "nowhere.safetensors")}}
    with pytest.raises(JobError, match="nowhere.safetensors"):
        with processes.early(executor) as started:
            runner.run(validate(missing), lambda key: "test", [], ["test"], started=started)
    assert all(not s.process.is_alive() for s in started)


KILLABLE = {
    "multi": ["executor=multi", "executor.devices=[cpu,cpu]"],
    "ray": ["executor=ray", "executor.workers=2", "executor.num_gpus=0"],
}


def _workers(executor: str, driver_pid: int) -> list[psutil.Process]:
    if executor == "multi":
        return [c for c in psutil.Process(driver_pid).children()
                if "resource_tracker" not in " ".join(c.cmdline())]
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "RayWorker" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.parametrize("executor", list(KILLABLE))
def test_a_worker_killed_mid_batch_has_its_batch_rendered_again(tmp_path: Path, executor):
    job = {**PLAIN, "params": {**PLAIN["params"], "steps": 8, "seed": [1, 2, 3]}}
    write_job(tmp_path, "six", "# @package _global_\n" + json.dumps(job))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdbatch", "+job=six", "run.dir=r", *KILLABLE[executor],
         "executor.threads=1", "executor.max_batch=1", "run.progress=quiet"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    manifest = tmp_path / "r" / "manifest.jsonl"
    deadline = time.monotonic() + 240
    while not (manifest.exists() and manifest.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    running = _workers(executor, proc.pid)
    assert len(running) == 2
    running[0].send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    found = entries(tmp_path / "r")
    assert len(found) == 6 and all(e["status"] == "ok" for e in found)
    assert any(e.get("worker_restarts") == 1 for e in found)


def test_out_of_memory_splits_the_batch_then_tiles_the_vae(tmp_path: Path, monkeypatch):
    """A batch of two runs out of memory whole: it is run in halves and says so. An image
    that runs out even alone is drawn with the VAE in tiles."""
    real = workers.STAGES["txt2img"]

    def tight(stack, renders, on_step=None, **kw):
        tiled = stack.pipe.vae.tile_sample_min_size <= workers.OOM_VAE_TILE_PX
        if len(renders) > 1 or (renders[0].prompt == "a blue tower" and not tiled):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(stack, renders, on_step, **kw)

    monkeypatch.setitem(workers.STAGES, "txt2img", tight)
    job = {**PLAIN, "params": {**PLAIN["params"], "batch_size": 2, "seed": [1, 3]}}
    assert run_job(job, tmp_path / "r", {**EXECUTORS["local"], "max_batch": 2}) == 0
    retries = {e["recipe"]["params"]["prompt"]: e["oom_retries"] for e in entries(tmp_path / "r")}
    assert retries == {"a red house": ["split"], "a blue tower": ["split", "vae_tiling"]}
    assert len(entries(tmp_path / "r")) == 8
    assert all(e["recipe"]["stages"][0]["oom_retries"] == e["oom_retries"]
               for e in entries(tmp_path / "r"))  # the stage's record, the PNG's too

    # with memory to spare now, reproduce and verify make those passes as they were made
    from sdbatch.reports import verify
    from sdbatch.reproduce import reproduce

    monkeypatch.undo()
    by_prompt = {e["recipe"]["params"]["prompt"]: e for e in entries(tmp_path / "r")}
    for prompt, entry in by_prompt.items():
        assert reproduce(tmp_path / "r" / entry["file"]), prompt
    report = verify.verify(tmp_path / "r", tmp_path / "report")
    assert report.ok and len(report.checks) == 8 and all(c.bytes_same for c in report.checks)


def test_an_image_that_keeps_failing_is_named_at_the_end_and_the_run_goes_on(
        tmp_path: Path, monkeypatch, capsys):
    real = workers.STAGES["txt2img"]

    def broken(stack, renders, on_step=None, **kw):
        if any(r.prompt == "a blue tower" for r in renders):
            raise torch.OutOfMemoryError("CUDA out of memory, always")
        return real(stack, renders, on_step, **kw)

    monkeypatch.setitem(workers.STAGES, "txt2img", broken)
    passes_of_a_prompt = {**EXECUTORS["local"], "max_batch": 2}
    assert run_job(PLAIN, tmp_path / "r", passes_of_a_prompt) == runner.EXIT_FAILURES
    found = entries(tmp_path / "r")
    assert sorted(e["status"] for e in found) == ["failed", "failed", "ok", "ok"]
    out = capsys.readouterr().out
    assert "failed images (2;" in out and "OutOfMemoryError: CUDA out of memory, always" in out
    assert "sdbatch resume" in out


def test_the_driver_prefers_the_worker_that_holds_the_stack_and_the_input():
    from sdbatch.plan import Batch, StageCall

    def batch(stack: str, input_key: str | None = None) -> Batch:
        return Batch("txt2img", (None,), (StageCall("txt2img", {"s": stack, "i": input_key},
                                                    input_key, stack),))

    a1, b1, a2 = batch("A"), batch("B"), batch("A", "k")
    holds = {0: "A", 1: "B"}.get
    assert driver.pick([b1, a1], 0, holds, [1], {}) is a1  # its stack first
    assert driver.pick([b1, a1], 1, holds, [0], {}) is b1
    assert driver.pick([a1, a2], 0, holds, [1], {"k": 0}) is a2  # its stack and its input
    assert driver.pick([a1], 1, holds, [0], {}) is a1  # nothing for B: take what is ready
    c = batch("C")
    assert driver.pick([a1, c], 1, holds, [0], {}) is c  # a stack nobody holds before A


class FakeRay:
    """Ray's surface RayPool uses, recording what it is asked; its init installs a SIGTERM
    handler that exits, as Ray's does."""

    def __init__(self, cpus=None, gpus=0, refuse=False):
        self.cpus, self.gpus, self.refuse, self.init_kwargs = cpus, gpus, refuse, None

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        if self.refuse:
            raise ConnectionError("Could not find any running Ray instance.\nmore")
        self.init_kwargs = kwargs
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))

    def cluster_resources(self):
        cpus = self.cpus if self.cpus is not None else self.init_kwargs["num_cpus"]
        return {"CPU": cpus, "GPU": self.gpus}

    def remote(self, **resources):
        return lambda cls: type("Actor", (), {"remote": staticmethod(lambda *a: object())})

    def kill(self, actor):
        pass

    def shutdown(self):
        pass


def test_ray_sizes_its_cluster_to_its_actors_and_keeps_the_runs_sigterm(monkeypatch):
    """A local cluster gets a CPU for each actor it will hold (one per GPU by default: with
    one CPU the second actor would never be placed and the run would hang); Ray's own
    SIGTERM handler (exit at once) does not replace the run's (finish the batches)."""
    from sdbatch.executors import PoolError
    from sdbatch.executors.ray_actors import RayPool

    def mine(*_):
        pass

    ray = FakeRay(gpus=2)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    before = signal.signal(signal.SIGTERM, mine)
    try:
        pool = RayPool(None, validate({"executor": {"name": "ray"}}).executor, "r")
        assert ray.init_kwargs["num_cpus"] == 2 and pool.workers == [0, 1]
        assert signal.getsignal(signal.SIGTERM) is mine
        monkeypatch.setitem(sys.modules, "ray", FakeRay(cpus=1, gpus=4))
        with pytest.raises(PoolError, match=r"4 actors .* do not fit .* 1 CPUs .*"
                                            r"lower executor\.workers"):
            RayPool(None, validate({"executor": {"name": "ray", "address": "auto"}}).executor,
                    "r")
        monkeypatch.setitem(sys.modules, "ray", FakeRay(refuse=True))
        with pytest.raises(PoolError, match=r"executor\.address=ray://nowhere:1: no Ray "
                                            r"cluster there \(Could not find.*instance\.\)"):
            RayPool(None, validate({"executor": {"name": "ray", "address": "ray://nowhere:1",
                                                 "num_gpus": 0}}).executor, "r")
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_intermediate_that_cannot_be_written_fails_the_run_naming_its_file(
        tmp_path: Path, monkeypatch):
    """A full disk under intermediates/ stops the run with the path named (not a traceback)
    and run.json saying the session failed."""
    import errno

    from sdbatch import atomic
    from sdbatch.output.writer import WriteError

    real = atomic.write_bytes

    def full(path, data):
        if "intermediates" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", full)
    job = {**POST, "post": [{"hires_fix": {"scale": 1.5, "denoise": 0.3, "steps": 2}}]}
    with pytest.raises(WriteError, match=r"cannot write .*intermediates.*No space left"):
        run_job(job, tmp_path / "run", EXECUTORS["local"])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["sessions"][-1]["status"] == "failed"


def test_slurms_last_time_out_ends_the_task_and_fails_no_image(tmp_path: Path, monkeypatch):
    """submitit's handler raises UncompletedJobError (a RuntimeError) when SLURM's time is
    up for good: the task ends (its session interrupted, for a resume), no image failed."""
    from submitit.core.utils import UncompletedJobError

    def time_up(stack, renders, on_step=None, **kw):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.setitem(workers.STAGES, "txt2img", time_up)
    with pytest.raises(UncompletedJobError):
        run_job(PLAIN, tmp_path / "r", EXECUTORS["local"])
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["sessions"][-1]["status"] == "interrupted"
    assert not (tmp_path / "r" / "manifest.jsonl").exists() or entries(tmp_path / "r") == []


def test_an_input_is_let_go_when_its_last_consumer_ends_even_failing():
    """A base picture kept for its two post-steps is released (store and worker) once both
    ended, the failed one included; before, a failure kept it for the run's life."""
    from sdbatch.plan import Batch, StageCall
    from sdbatch.stages.picture import Picture

    def batch(name: str, input_key: str | None = None) -> Batch:
        return Batch("txt2img", (None,), (StageCall("txt2img", {"n": name}, input_key, "A"),))

    base = batch("base")
    ok, failing = batch("ok", base.calls[0].key), batch("failing", base.calls[0].key)

    class Store:
        def __init__(self):
            self.kept, self.released = {}, []

        def put(self, key, picture):
            self.kept[key] = picture

        def get(self, key):
            return self.kept[key]

        def release(self, key):
            self.released.append(key)

    class OneWorker:
        workers = [0]

        def __init__(self):
            self.tasks = []

        def holds(self, worker):
            return "A"

        def submit(self, worker, task):
            self.tasks.append(task)

        def wait(self):
            task = self.tasks[-1]
            if task.batch is failing:
                return [driver.Done(0, workers.Outcome(None, "boom", 0.0))]
            return [driver.Done(0, workers.Outcome([Picture(None)], None, 0.0))]

    store, pool = Store(), OneWorker()
    results = list(driver.drive([base, failing, ok], pool, store, None))
    assert [r.error for r in results] == [None, "boom", None]
    assert store.released == [base.calls[0].key]
    assert pool.tasks[0].keep == (base.calls[0].key,)  # kept by the worker that made it


def test_control_maps_kept_in_memory_are_bounded_and_read_back_from_disk(tmp_path: Path,
                                                                         monkeypatch):
    """A sweep over many control images: the maps beyond MAPS_KEPT leave memory and come
    back from controlnet/ (a run keeps nothing per image)."""
    import numpy as np
    from PIL import Image

    from sdbatch.executors import intermediates

    monkeypatch.setattr(intermediates, "MAPS_KEPT", 2)
    maps = intermediates.ControlMaps(tmp_path)
    units = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
        units.append({"map": f"k{i}", "preprocessor": "none", "image": str(tmp_path / f"{i}.png"),
                      "processor_res": 64, "low_threshold": 100, "high_threshold": 200})
    first = [maps.get(u) for u in units]
    assert len(maps._memory) == 2
    again = maps.get(units[0])  # from controlnet/k0.png
    assert np.array_equal(again, first[0]) and again[0, 0, 0] == 0


def test_a_gpu_worker_makes_its_own_device_the_current_one(monkeypatch):
    from sdbatch.executors import multi

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert multi.bind("cuda:1") == torch.device("cuda:1")
    assert multi.bind("cpu") == torch.device("cpu")
    assert multi.bind("cuda") == torch.device("cuda")  # set_device refuses a device sans index
    assert current == [torch.device("cuda:1")]  # a CPU worker leaves CUDA alone
