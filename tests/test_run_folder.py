"""The run folder is never corrupted or silently overwritten: one process at a time, and a
resume that would change the images there is refused, naming what changed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from safetensors.torch import load_file, save_file

from sdbatch import run as runner
from sdbatch.models import tiny
from sdbatch.output.lock import LOCK, NOTE, RunFolderBusy, RunLock, pid_alive
from sdbatch.schema import JobError, validate

REPO = Path(__file__).resolve().parents[1]
HOLD = """import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from sdbatch.output.lock import RunLock
lock = RunLock(Path(sys.argv[1]), "2026-01-01T00:00:00").acquire()
print("held", flush=True)
{then}
"""


def holder(folder: Path, then: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), then=then),
                             str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path):
    proc = holder(tmp_path / "r", "time.sleep(60)")
    try:
        with pytest.raises(RunFolderBusy, match=f"pid {proc.pid} on {socket.gethostname()}, "
                           "started 2026-01-01T00:00:00"):
            RunLock(tmp_path / "r", "now").acquire()
        raw = {"prompt": "x", "params": {"steps": 1, "width": 64, "height": 64},
               "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
        with pytest.raises(JobError, match=f"run.dir .*in use by pid {proc.pid}"):
            runner.run(validate(raw), lambda key: "test", [], [])
        assert not (tmp_path / "r" / "run.json").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path: Path):
    """kill -9: the OS frees the lock, the note stays; the next process takes over."""
    proc = holder(tmp_path / "r", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    proc.wait()
    assert not pid_alive(proc.pid) and (tmp_path / "r" / NOTE).exists()
    lock = RunLock(tmp_path / "r", "now").acquire()
    assert lock.took_over is not None and lock.took_over.pid == proc.pid
    assert json.loads((tmp_path / "r" / NOTE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "r" / NOTE).exists()


def held_by_a_dead_process(folder: Path) -> tuple[Path, FileLock, int]:
    """A run folder whose OS lock is held (here, as a forked child would hold it) and the
    pid of a process that has ended, for a note to name: a stale lock, once noted."""
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    held = FileLock(folder / LOCK, timeout=0)
    held.acquire()
    return folder, held, int(dead)


def test_a_lock_that_outlived_its_process_is_broken_only_when_stale(tmp_path: Path):
    """An OS lock still held (by a forked child, say) whose note names a dead pid of this
    host is stale; one naming a live pid, or another host, is not."""
    folder, held, dead = held_by_a_dead_process(tmp_path / "r")
    try:
        for pid, host in ((os.getpid(), socket.gethostname()), (dead, "other-host")):
            (folder / NOTE).write_text(json.dumps({"pid": pid, "host": host, "started": "t"}))
            with pytest.raises(RunFolderBusy, match=f"pid {pid} on {host}"):
                RunLock(folder, "now").acquire()
        (folder / NOTE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                               "started": "t"}))
        lock = RunLock(folder, "now").acquire()
        assert lock.took_over.pid == dead
        lock.release()
    finally:
        held.release()


def test_pid_alive():
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)


BASE = {"prompt": "a __colour__ house <lora:lego:0.5>", "negative_prompt": "blurry",
        "dynamic_prompts": {"mode": "random"},
        "params": {"sampler": "Euler", "steps": 2, "seed": 11, "width": 64, "height": 64}}


def job(tmp_path: Path, **changes) -> dict:
    raw = json.loads(json.dumps(BASE))
    raw["paths"] = {"wildcards": str(tmp_path / "wildcards"), "models": str(tmp_path / "m")}
    raw["run"] = {"dir": str(tmp_path / "r"), "progress": "quiet"}
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def refusal(raw: dict) -> str:
    with pytest.raises(JobError) as e:
        runner.run(validate(raw), lambda key: "test", [], [])
    return str(e.value)


def test_a_resume_that_would_change_the_images_is_refused(tmp_path: Path, capsys):
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards/colour.txt").write_text("red\n")
    lora = tmp_path / "m/Lora/lego.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes((tiny.family_models() / "Lora/LegoAlrev.safetensors").read_bytes())
    assert runner.run(validate(job(tmp_path)), lambda key: "test", [], []) == 0
    manifest = (tmp_path / "r/manifest.jsonl").read_bytes()

    assert "changed in params.steps" in refusal(job(tmp_path, params__steps=3))
    assert "changed in run.filename" in refusal(job(tmp_path, run__filename="[seed]-[index]"))
    (tmp_path / "wildcards/colour.txt").write_text("blue\n")  # random mode: drawn per image
    assert "1 image(s) there would come out differently (image 00000: prompt)" in \
        refusal(job(tmp_path))
    (tmp_path / "wildcards/colour.txt").write_text("red\n")
    tensors = load_file(lora)
    save_file({k: v * 2 for k, v in tensors.items()}, lora)
    assert "changed in networks.lora:lego" in refusal(job(tmp_path))
    save_file(tensors, lora)
    text = refusal(job(tmp_path, model__dtype="bfloat16"))
    assert "rendered on cpu in float32, this session would render on cpu in bfloat16" in text
    assert "run.allow_device_change=true" in text
    assert (tmp_path / "r/manifest.jsonl").read_bytes() == manifest  # nothing touched

    capsys.readouterr()
    allowed = job(tmp_path, model__dtype="bfloat16", run__allow_device_change=True)
    assert runner.run(validate(allowed), lambda key: "test", [], []) == 0
    assert "0 rendered, 1 already there" in capsys.readouterr().out



def test_a_device_change_resume_of_a_job_from_an_init_image(tmp_path: Path, capsys):
    """The allowed device change plans the earlier sessions again: with the job's input
    images, which an init image's chain starts from."""
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "init.png")
    raw = {"prompt": "a house", "init_image": str(tmp_path / "init.png"),
           "params": {"sampler": "Euler", "steps": 2, "seed": 11, "width": 64, "height": 64},
           "post": [{"img2img": {"denoise": 0.5}}],
           "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], []) == 0
    capsys.readouterr()
    raw["model"] = {"dtype": "bfloat16"}
    raw["run"]["allow_device_change"] = True
    assert runner.run(validate(raw), lambda key: "test", [], []) == 0
    assert "0 rendered, 1 already there" in capsys.readouterr().out


def test_recording_grids_waits_for_run_json_lock(tmp_path: Path):
    """`sdbatch grid` on a running run: its run.json write waits for a session's, so
    neither is lost."""
    import threading

    from sdbatch.output.run_folder import record_grids

    (tmp_path / "run.json").write_text(json.dumps({"sessions": []}))
    with FileLock(tmp_path / "run.json.lock"):
        writer = threading.Thread(target=record_grids, args=(tmp_path, ["grids/a.png"]))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and "grids" not in json.loads((tmp_path / "run.json").read_text())
    writer.join(10)
    assert json.loads((tmp_path / "run.json").read_text())["grids"] == ["grids/a.png"]


def test_file_names_equal_but_for_case_are_refused_before_any_work(tmp_path: Path):
    """Windows and macOS keep one file for 'A cat.png' and 'a cat.png': the second image
    would overwrite the first while the manifest vouched for both."""
    from sdbatch.run import same_file_names

    assert same_file_names(["A cat.png", "a cat.png", "dog.png"]) == ["A cat.png"]
    assert same_file_names(["caf\u00e9.png", "cafe\u0301.png"]) == ["caf\u00e9.png"]  # NFC/NFD
    assert same_file_names(["a.png", "b.png"]) == []
    raw = {**job(tmp_path), "prompt": ["A cat", "a cat"]}
    raw["run"] = {**raw["run"], "filename": "[prompt_words]"}
    assert "run.filename (test): '[prompt_words]' gives 1 names to several images" in \
        refusal(raw)
    assert not (tmp_path / "r").exists()


def test_a_path_over_windows_limit_is_refused_before_any_work(tmp_path: Path, monkeypatch):
    """Windows without long paths fails the first write of a name past 260 characters,
    after the render; the job is refused up front instead, naming the fix."""
    from sdbatch.output import filenames

    monkeypatch.setattr(filenames.sys, "platform", "win32")
    monkeypatch.setattr(filenames, "long_paths_enabled", lambda: False)
    raw = {"prompt": "a red house", "params": BASE["params"],
           "run": {"dir": str(tmp_path / ("d" * 200)), "filename": "[index]-[prompt_words]"}}
    text = refusal(raw)
    assert "run.filename (test):" in text and "over Windows' 260-character limit" in text
    assert not (tmp_path / ("d" * 200)).exists()
    # the intermediates a post-step writes are longer than a short image name
    files = ["images/00000-11.png", "intermediates/" + "0" * 24 + ".safetensors"]
    assert filenames.too_long_on_windows(Path("/" + "d" * 200), files[:1]) is None
    assert "intermediates" in filenames.too_long_on_windows(Path("/" + "d" * 200), files)
    monkeypatch.setattr(filenames, "long_paths_enabled", lambda: True)
    assert filenames.too_long_on_windows(Path("/" + "d" * 200), files) is None


BREAKER = """import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from sdbatch.output import lock
folder, me = Path(sys.argv[1]), sys.argv[2]
real = lock.Holder.stale

def wait_for(*names):
    while not all((folder.parent / n).exists() for n in names):
        time.sleep(0.01)

def stale(self, host):
    found = real(self, host)
    (folder.parent / me).touch()
    wait_for("breaker-0", "breaker-1")  # both found the same file stale
    if me == "breaker-1":
        wait_for("held-0")  # and the other broke it first
    return found

lock.Holder.stale = stale
try:
    lock.RunLock(folder, "now").acquire()
except lock.RunFolderBusy:
    print("busy", flush=True)
else:
    print("held", flush=True)
    (folder.parent / f"held-{{me[-1]}}").touch()
    time.sleep(3)  # still holding while the other one tries
"""


def test_two_processes_breaking_one_stale_lock_make_one_holder(tmp_path: Path):
    """Both find the lock stale; the second to break finds the file replaced by the first
    and is refused, instead of breaking the first's live lock too."""
    folder, held, dead = held_by_a_dead_process(tmp_path / "r")
    (folder / NOTE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                           "started": "t"}))
    try:
        breakers = [subprocess.Popen([sys.executable, "-c", BREAKER.format(repo=str(REPO)),
                                      str(folder), f"breaker-{n}"], stdout=subprocess.PIPE,
                                     text=True) for n in range(2)]
        said = sorted(b.communicate(timeout=60)[0].strip() for b in breakers)
    finally:
        held.release()
    assert said == ["busy", "held"]  # without the check: both held
