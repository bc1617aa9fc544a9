"""`sdbatch ls` and `sdbatch show` on a run of the tiny model with a hires fix axis (rendered
once for the module), and on copies of it left as a kill and a failure leave a folder."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from sdbatch import run as runner
from sdbatch.reports import listing
from sdbatch.schema import validate

JOB = {"job": {"name": "hires_sweep"}, "prompt": "a red house", "negative_prompt": "blurry",
       "params": {"sampler": "Euler a", "steps": 2, "seed": 5, "width": 64, "height": 64},
       "post": [{"hires_fix": {"scale": 1.5, "upscaler": "Lanczos", "steps": 2,
                               "denoise": [0.3, 0.6]}}]}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    raw = {**JOB, "run": {"dir": str(root / "hires_sweep" / "a"), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == runner.EXIT_OK
    return root


def test_ls_lists_each_run_with_counts_status_and_wall_time(outputs: Path, tmp_path: Path):
    root = tmp_path / "outputs"
    shutil.copytree(outputs, root)
    killed = root / "hires_sweep" / "b"
    shutil.copytree(root / "hires_sweep" / "a", killed)
    info = json.loads((killed / "run.json").read_text())
    info["created"] = "2099-01-01T00:00:00+00:00"  # listed last
    info["status"] = info["sessions"][-1]["status"] = "running"  # as a kill -9 leaves it
    del info["sessions"][-1]["ended"]
    (killed / "run.json").write_text(json.dumps(info))
    entries = (killed / "manifest.jsonl").read_text().splitlines()
    failed = {**json.loads(entries[1]), "status": "failed", "error": "out of memory"}
    (killed / "manifest.jsonl").write_text(entries[0] + "\n" + json.dumps(failed) + "\n")
    header, done, stopped = listing.ls(root).splitlines()
    assert header.split() == ["JOB", "DATE", "OK", "FAILED", "TOTAL", "STATUS", "WALL", "FOLDER"]
    assert done.split()[0] == "hires_sweep"
    assert done.split()[3:7] == ["2", "0", "2", "complete"]
    assert stopped.split()[3:7] == ["1", "1", "2", "stopped"]
    assert done.split()[-1] == str(root / "hires_sweep" / "a")
    assert listing.ls(root / "hires_sweep" / "b").splitlines()[1].split() == stopped.split()
    assert listing.ls(tmp_path / "empty") == f"no sdbatch runs under {tmp_path / 'empty'}"


def test_wall_time_counts_every_session():
    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    sessions = [{"started": t.isoformat(), "ended": (t + dt.timedelta(seconds=70)).isoformat()},
                {"started": (t + dt.timedelta(hours=1)).isoformat()}]  # killed
    last = t + dt.timedelta(hours=1, seconds=30)
    assert listing.wall_seconds(sessions, last, running=False) == 100
    assert listing.wall_seconds([], None, running=False) is None
    assert [listing.duration(s) for s in (4.21, 65.4, 3725, None)] == [
        "4.2s", "1m05s", "1h02m05s", "-"]


def test_show_prints_recipe_chain_and_infotext(outputs: Path):
    image = outputs / "hires_sweep" / "a" / "images" / "00001-5.png"
    text = listing.show(image)
    assert text.splitlines()[0].startswith(f"{image}  (image 1, sdbatch ")
    assert "status: ok" in text.splitlines()[1]
    recipe = text[text.index("recipe:"):text.index("chain:")]
    assert "  prompt: a red house\n" in recipe and "  steps: 2\n" in recipe
    chain = text[text.index("chain:"):text.index("infotext:")].splitlines()
    assert chain[1].startswith("  1. txt2img  key ")
    assert chain[2] == "       (the recipe's parameters)"
    assert chain[3].startswith("  2. hires_fix  key ") and " <- " in chain[3]
    assert "       denoise: 0.6" in chain and "       upscaler: Lanczos" in chain
    infotext = text[text.index("infotext:"):].splitlines()
    assert infotext[1] == "  a red house" and infotext[2] == "  Negative prompt: blurry"
    assert "Denoising strength: 0.6" in infotext[3] and "Hires upscaler: Lanczos" in infotext[3]


def test_show_refuses_a_picture_sdbatch_did_not_make(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match="no 'sdbatch' chunk"):
        listing.show(tmp_path / "other.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "other.jpg")
    with pytest.raises(ValueError, match="a JPEG picture, not a PNG"):
        listing.show(tmp_path / "other.jpg")


def test_ls_and_show_on_the_command_line(outputs: Path, tmp_path: Path):
    from .conftest import sdbatch

    out = sdbatch(tmp_path, "ls", str(outputs)).stdout
    assert "hires_sweep" in out and "complete" in out
    image = outputs / "hires_sweep" / "a" / "images" / "00000-5.png"
    assert "chain:" in sdbatch(tmp_path, "show", str(image)).stdout
    proc = sdbatch(tmp_path, "ls", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    assert "sdbatch ls FOLDER" in proc.stderr
    run = outputs / "hires_sweep" / "a"
    assert "hires_sweep" in sdbatch(tmp_path, "ls", str(run / "run.json")).stdout
    proc = sdbatch(tmp_path, "grid", str(run), "--max-megapixels", "0", check=False)
    assert proc.returncode == 2 and "--max-megapixels 0: give a budget above 0" in proc.stderr


def test_output_the_console_cannot_encode_is_escaped_not_a_crash(tmp_path: Path):
    """Windows writes redirected output in its code page: a Japanese prompt or path raised
    UnicodeEncodeError (here: an ASCII console)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    folder = tmp_path / "東京"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "sdbatch", "ls", str(folder)], cwd=tmp_path,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                    "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert b"\\u6771\\u4eac" in proc.stdout


def test_ls_skips_a_run_json_that_is_no_sdbatch_runs(outputs: Path, tmp_path: Path):
    """Another tool's run.json, or a torn one, below the folder listed: no traceback, no
    row; a run.json file given stands for its folder."""
    root = tmp_path / "mixed"
    shutil.copytree(outputs, root)
    for name, text in (("torn", "{"), ("empty", "{}"), ("list", "[1]")):
        (root / name).mkdir()
        (root / name / "run.json").write_text(text)
    listed = listing.ls(root)
    assert "hires_sweep" in listed and "torn" not in listed and "empty" not in listed
    assert listing.find_runs(root / "torn") == []


def test_show_into_a_reader_that_stopped_is_quiet(outputs: Path, tmp_path: Path):
    """`sdbatch show IMG | head -3`: the reader closing the pipe is no error."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    image = outputs / "hires_sweep" / "a" / "images" / "00000-5.png"
    proc = subprocess.Popen([sys.executable, "-m", "sdbatch", "show", str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # before the command writes: its print meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Broken pipe" not in err
