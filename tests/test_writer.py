"""The writer thread: images are written while the next batch renders, each file before its
manifest line, everything queued written on Ctrl-C, and a failed write stops the run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from sdbatch import run as runner
from sdbatch.output import manifest
from sdbatch.output.run_folder import RunFolder
from sdbatch.output.writer import WriteError, Writer
from sdbatch.schema import validate


def folder_in(tmp_path: Path) -> RunFolder:
    return RunFolder.create(tmp_path / "run", {"job": {}}, [], 1, 4, {})


def entry(i: int) -> dict:
    return {"index": i, "id": f"{i:05d}", "key": f"k{i}", "seed": i}


def picture(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i * 40, 0, 0))


class Gate:
    """Holds the writer inside its first image write until opened."""

    def __init__(self, folder: RunFolder, monkeypatch):
        self.entered, self.open = threading.Event(), threading.Event()
        real = folder.write_image

        def write_image(name, data, entry):
            self.entered.set()
            assert self.open.wait(30), "the gate was never opened"
            real(name, data, entry)

        monkeypatch.setattr(folder, "write_image", write_image)


def test_the_run_goes_on_while_the_writer_writes_and_close_writes_everything(tmp_path,
                                                                            monkeypatch):
    folder = folder_in(tmp_path)
    gate = Gate(folder, monkeypatch)
    writer = Writer(folder, threaded=True)
    writer.image("0.png", picture(0), "a", {}, entry(0))
    assert gate.entered.wait(30)
    writer.image("1.png", picture(1), "b", {}, entry(1))  # returns while image 0 is held
    writer.failure(entry(2), "boom")
    writer.image("3.png", picture(3), "d", {}, entry(3))
    assert manifest.read(folder.path / "manifest.jsonl") == {}
    gate.open.set()
    writer.close()
    lines = [json.loads(x) for x in (folder.path / "manifest.jsonl").read_text().splitlines()]
    assert [(e["index"], e["status"]) for e in lines] == [(0, "ok"), (1, "ok"), (2, "failed"),
                                                           (3, "ok")]
    reopened = RunFolder(folder.path)
    for e in lines:
        if e["status"] == "ok":
            assert reopened.is_done(e["index"], e["key"])
    assert folder.done == {}  # a run keeps no line it wrote: its memory stays flat


def test_a_requeue_while_closing_writes_every_queued_image_first(tmp_path, monkeypatch):
    """submitit requeues a task SLURM warned of its time limit by raising SystemExit in the
    main thread: arriving while close() waits for the writer, it ends the task only after
    every queued image and line is written."""
    folder = folder_in(tmp_path)
    gate = Gate(folder, monkeypatch)
    writer = Writer(folder, threaded=True)
    for i in range(3):
        writer.image(f"{i}.png", picture(i), "a", {}, entry(i))
    assert gate.entered.wait(30)
    real_join = writer._thread.join

    def join(timeout=None):  # the signal lands while the main thread waits here
        monkeypatch.setattr(writer._thread, "join", real_join)
        gate.open.set()
        raise SystemExit(-1)

    monkeypatch.setattr(writer._thread, "join", join)
    with pytest.raises(SystemExit):
        writer.close()
    assert sorted(manifest.read(folder.path / "manifest.jsonl")) == [0, 1, 2]


@pytest.mark.parametrize("threaded", [True, False])
def test_a_failed_write_stops_the_writer_and_is_raised(tmp_path, monkeypatch, threaded):
    folder = folder_in(tmp_path)

    def full(name, data, entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder, "write_image", full)
    writer = Writer(folder, threaded=threaded)
    with pytest.raises(WriteError, match="No space left on device"):
        writer.image("0.png", picture(0), "a", {}, entry(0))
        writer.failure(entry(1), "later")  # queued behind the failed write: never written
        writer.close()
    writer.close()  # the error was raised once; closing again is quiet
    assert manifest.read(folder.path / "manifest.jsonl") == {}


def test_ctrl_c_writes_every_rendered_image_before_the_run_ends(tmp_path, monkeypatch):
    """Ctrl-C (at once) right after the first batch, while the writer is still held inside
    the first image: the run waits for the queue, so every image of that batch is kept."""
    opened = threading.Event()
    real_write, real_close, real_execute = RunFolder.write_image, Writer.close, runner.drive

    def write_image(self, name, data, entry):
        assert opened.wait(30)
        real_write(self, name, data, entry)

    def close(self):
        opened.set()  # the writer may only go on once the run is draining it
        real_close(self)

    def execute(*args, **kwargs):
        results = real_execute(*args, **kwargs)
        yield next(results)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "write_image", write_image)
    monkeypatch.setattr(Writer, "close", close)
    monkeypatch.setattr(runner, "drive", execute)
    raw = {"prompt": "a house", "params": {"sampler": "Euler", "steps": 2, "seed": 3,
                                           "batch_size": 2, "batch_count": 2,
                                           "width": 64, "height": 64},
           "executor": {"max_batch": 2},
           "run": {"dir": str(tmp_path / "r"), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == runner.EXIT_INTERRUPTED
    written = manifest.read(tmp_path / "r" / "manifest.jsonl")
    assert sorted(written) == [0, 1] and all(e["status"] == "ok" for e in written.values())
    assert sorted(p.name for p in (tmp_path / "r" / "images").iterdir()) == \
        sorted(Path(e["file"]).name for e in written.values())
    status = json.loads((tmp_path / "r" / "run.json").read_text())
    assert status["status"] == "interrupted" and status["counts"]["rendered"] == 2
