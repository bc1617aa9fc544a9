"""End to end on the tiny model: the run folder, determinism, resume, reproduce."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdbatch import run as runner
from sdbatch.executors import worker as local
from sdbatch.models.stack import pick_device
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.schema import validate

from .conftest import SMALL_JOB, sdbatch, write_job


def run_job(raw: dict, folder: Path) -> int:
    raw = {**raw, "run": {**raw.get("run", {}), "dir": str(folder), "progress": "quiet"}}
    return runner.run(validate(raw), lambda key: "test", [], ["test"])


def shas(folder: Path) -> dict[str, str]:
    entries = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    return {e["file"]: e["sha256"] for e in entries if e["status"] == "ok"}


SMALL = {"prompt": ["a red house", "a blue tower"], "negative_prompt": "blurry",
         "params": {"sampler": "Euler a", "steps": 4, "cfg_scale": [5, 7], "seed": 11,
                    "width": 64, "height": 64}}


def test_run_folder_layout_and_metadata(tmp_path: Path):
    assert run_job(SMALL, tmp_path / "r") == 0
    r = tmp_path / "r"
    assert {p.name for p in r.iterdir()} == {"config.yaml", "overrides.yaml", "manifest.jsonl",
                                             "run.json", "images", "run.lock",
                                             "manifest.jsonl.lock", "run.json.lock", "index.html",
                                             "grids"}
    info = json.loads((r / "run.json").read_text())
    assert info["status"] == "complete" and info["counts"]["rendered"] == 4
    assert set(info["versions"]) >= {"python", "torch", "diffusers", "transformers"}
    device = pick_device("auto")  # where this machine renders: cpu, or cuda where there is one
    assert info["device"] == device.type and info["started"] and info["ended"]
    assert info["dtype"] == ("float16" if device.type == "cuda" else "float32")
    assert info["threads"] == torch.get_num_threads()
    assert info["made_of"]["models"]["tiny"]["device"] == device.type
    entries = [json.loads(x) for x in (r / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    first = entries[0]
    assert first["file"] == "images/00000-11.png" and first["seed"] == 11
    assert first["recipe"]["params"]["sampler"] == "Euler a" and first["status"] == "ok"
    assert first["recipe"]["model"]["name"] == "tiny" and first["stack"]
    assert first["recipe"]["device"] == {"device": device.type, "threads": info["threads"],
                                         "device_name": info["device_name"]}
    assert first["recipe"]["model"]["dtype"] == info["dtype"]
    assert first["timings"]["render_s"] > 0
    config = yaml.safe_load((r / "config.yaml").read_text())
    assert config["params"]["cfg_scale"] == [5.0, 7.0]
    text = png.read_text(r / first["file"])
    prompt, negative, params = parse_infotext(text["parameters"])
    assert (prompt, negative) == ("a red house", "blurry")
    assert params["Steps"] == "4" and params["Sampler"] == "Euler a" and params["Seed"] == "11"
    assert params["CFG scale"] == "5" and params["Size"] == "64x64" and params["Model"] == "tiny"
    assert len(params["Model hash"]) == 10
    assert json.loads(text["sdbatch"])["recipe"]["params"]["prompt"] == "a red house"


def test_same_job_twice_gives_the_same_bytes(tmp_path: Path):
    run_job(SMALL, tmp_path / "a")
    run_job(SMALL, tmp_path / "b")
    assert shas(tmp_path / "a") == shas(tmp_path / "b")
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a/images").iterdir())]
    assert not np.array_equal(images[0], images[2])  # the prompt matters


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE Karras"])
def test_an_image_does_not_depend_on_its_pass(tmp_path: Path, sampler):
    """One image a pass, or the 12 (2 prompts x 2 CFG x 3 seeds) in passes of 8 and 4: the
    same pictures within a rounding level."""
    job = {**SMALL, "params": {**SMALL["params"], "sampler": sampler, "batch_size": 3}}
    run_job({**job, "executor": {"max_batch": 1}}, tmp_path / "one")
    run_job(job, tmp_path / "eight")
    names = sorted(p.name for p in (tmp_path / "one/images").iterdir())
    assert len(names) == 12
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one/images" / name), dtype=int)
        b = np.asarray(Image.open(tmp_path / "eight/images" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name


def test_random_seeds_are_recorded_and_kept_on_resume(tmp_path: Path):
    job = {**SMALL, "prompt": "x", "params": {**SMALL["params"], "seed": -1, "cfg_scale": 7}}
    run_job(job, tmp_path / "r")
    [entry] = [json.loads(x) for x in (tmp_path / "r/manifest.jsonl").read_text().splitlines()]
    assert entry["seed"] != -1
    assert run_job(job, tmp_path / "r") == 0
    [again] = [json.loads(x) for x in (tmp_path / "r/manifest.jsonl").read_text().splitlines()]
    assert again["seed"] == entry["seed"]


def test_a_failing_batch_never_loses_the_others(tmp_path: Path, monkeypatch):
    real = local.STAGES["txt2img"]

    def flaky(stack, renders, on_step=None):
        if renders[0].cfg_scale == 7:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(stack, renders, on_step)

    monkeypatch.setitem(local.STAGES, "txt2img", flaky)
    one_by_one = {**SMALL, "executor": {"max_batch": 1}}
    assert run_job(one_by_one, tmp_path / "r") == runner.EXIT_FAILURES
    entries = [json.loads(x) for x in (tmp_path / "r/manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in entries] == ["ok", "failed", "ok", "failed"]
    assert "out of memory" in entries[1]["error"]
    monkeypatch.setitem(local.STAGES, "txt2img", real)
    assert run_job(one_by_one, tmp_path / "r") == 0  # a re-run renders only the failed ones
    info = json.loads((tmp_path / "r/run.json").read_text())
    assert info["counts"] == {"rendered": 2, "skipped": 2, "failed": 0}


def test_a_run_folder_of_another_job_is_refused(tmp_path: Path):
    run_job(SMALL, tmp_path / "r")
    with pytest.raises(runner.JobError, match="changed in params.steps"):
        run_job({**SMALL, "params": {**SMALL["params"], "steps": 5}}, tmp_path / "r")


def test_max_batch_is_recorded_and_a_resume_with_another_is_refused(tmp_path: Path):
    """Which images share a pass moves pixels by a rounding level, so a run keeps its
    max_batch: another is refused naming the fix, and `sdbatch resume` uses the recorded
    one (for runs made before it was recorded: params.batch_size, their pass size)."""
    r = tmp_path / "r"
    run_job({**SMALL, "executor": {"max_batch": 3}}, r)
    info = json.loads((r / "run.json").read_text())
    assert info["made_of"]["max_batch"] == 3
    [first] = r.glob("images/00000-*.png")
    assert png.read_recipe(first)["job"]["executor"] == {"max_batch": 3}
    with pytest.raises(runner.JobError, match=r"passes of up to 3 images.*up to 8.*"
                                              r"give executor.max_batch=3"):
        run_job(SMALL, r)
    assert run_job({**SMALL, "executor": {"max_batch": 3}}, r) == 0
    # a run made before max_batch was recorded: its passes were params.batch_size (1)
    del info["made_of"]["max_batch"]
    (r / "run.json").write_text(json.dumps(info))
    config = yaml.safe_load((r / "config.yaml").read_text())
    del config["executor"]["max_batch"]
    (r / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(runner.JobError, match="give executor.max_batch=1"):
        run_job(SMALL, r)
    assert "complete: 0 rendered, 4 already there" in sdbatch(tmp_path, "resume", "r").stdout


# 12 images in passes of 4
MANY_JOB = SMALL_JOB.replace("seed: 11", "seed: [1, 2, 3]") + "executor:\n  max_batch: 4\n"

# Runs the CLI with a hook at a chosen image: the moment a test stops a run is exact.
STOP_AT = """import os, signal, sys
sys.path.insert(0, {repo!r})
from sdbatch.executors import worker as local
from sdbatch.output.run_folder import RunFolder
n, how = int(sys.argv.pop(1)), sys.argv.pop(1)
if how == "kill":  # kill -9 as image n (0-based) is about to be written
    write, count = RunFolder.write_image, []
    def write_image(self, *a):
        count.append(1)
        if len(count) == n + 1:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        return write(self, *a)
    RunFolder.write_image = write_image
else:  # Ctrl-C (or SIGTERM: a pre-emption) while batch n (1-based) is rendered
    stage, count = local.STAGES["txt2img"], []
    sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT
    def txt2img(*a, **k):
        count.append(1)
        if len(count) == n:
            os.kill(os.getpid(), sig)
        return stage(*a, **k)
    local.STAGES["txt2img"] = txt2img
from sdbatch.cli import main
main()
"""


def stop_at(tmp_path: Path, n: int, how: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "stop_at.py"
    script.write_text(STOP_AT.format(repo=str(Path(__file__).resolve().parents[1])))
    return subprocess.run([sys.executable, str(script), str(n), how, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_the_same_bytes(tmp_path: Path):
    write_job(tmp_path, "small", MANY_JOB)
    sdbatch(tmp_path, "+job=small", "run.dir=full")
    proc = stop_at(tmp_path, 5, "kill", "+job=small", "run.dir=killed")
    assert proc.returncode == -getattr(signal, "SIGKILL", signal.SIGTERM), proc.stderr
    manifest = tmp_path / "killed" / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == 5
    out = sdbatch(tmp_path, "resume", "killed").stdout
    assert "resuming: 5 already there, 7 to render" in out
    assert "complete: 7 rendered, 5 already there" in out
    assert shas(tmp_path / "killed") == shas(tmp_path / "full")
    files = sorted(p.name for p in (tmp_path / "killed/images").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "full/images").iterdir())


def test_resume_finds_the_pictures_its_job_file_named_beside_itself(tmp_path: Path):
    """config.yaml holds the job as expanded and located: `sdbatch resume`, whose job is
    config.yaml in the run folder, finds a picture the job file named relative to itself."""
    (tmp_path / "jobs" / "assets").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), (40, 160, 60), np.uint8)).save(
        tmp_path / "jobs" / "assets" / "start.png")
    write_job(tmp_path, "beside", SMALL_JOB + "init_image: assets/start.png\n"
              "post:\n  - img2img: {denoise: 0.5, steps: 2}\n")
    sdbatch(tmp_path, "+job=beside", "run.dir=r")
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["init_image"] == "jobs/assets/start.png"
    [first, *_] = sorted((tmp_path / "r" / "images").iterdir())
    first.unlink()
    assert "complete: 1 rendered, 3 already there" in sdbatch(tmp_path, "resume", "r").stdout
    first.unlink()  # and from another folder: the job's paths are the start folder's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = sdbatch(elsewhere, "resume", str(tmp_path / "r"))
    assert "complete: 1 rendered, 3 already there" in done.stdout
    assert f"working in {tmp_path}, where the run was started" in done.stderr


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_ctrl_c_or_sigterm_stops_after_the_batch_and_says_how_to_resume(tmp_path: Path, how):
    """SIGTERM (SLURM's pre-emption) stops as a first Ctrl-C does: the batch in flight is
    finished and written, and the run resumes from there."""
    write_job(tmp_path, "small", MANY_JOB)
    proc = stop_at(tmp_path, 2, how, "+job=small", "run.dir=r")
    assert proc.returncode == runner.EXIT_INTERRUPTED, proc.stderr
    assert "stopping after the batches in flight" in proc.stderr
    assert "interrupted: 8 rendered" in proc.stdout and "sdbatch resume r" in proc.stdout
    info = json.loads((tmp_path / "r/run.json").read_text())
    assert info["status"] == "interrupted" and info["counts"]["rendered"] == 8
    assert len(shas(tmp_path / "r")) == 8
    with Image.open(tmp_path / "r" / info["grids"][0]) as sheet:  # a partial grid
        cells = [c["status"] for row in json.loads(sheet.text["sdbatch_grid"])["cells"]
                 for c in row]
    # seeds by prompts (the longest axes), a sheet per CFG scale; the 8 images of the first
    # two passes (of 4) fill the first sheet but for its last cell
    assert info["grids"] == ["grids/seed-by-prompt-01.png", "grids/seed-by-prompt-02.png"]
    assert cells == ["ok"] * 5 + ["missing"]
    out = sdbatch(tmp_path, "+job=small", "run.dir=r").stdout  # re-running the job resumes
    assert "complete: 4 rendered, 8 already there" in out
    assert len(shas(tmp_path / "r")) == 12


def test_reproduce_matches_bytes(tmp_path: Path):
    job = {**SMALL, "params": {**SMALL["params"], "batch_size": 2}, "executor": {"max_batch": 3}}
    run_job(job, tmp_path / "r")
    [image] = (tmp_path / "r/images").glob("00004-*.png")  # the middle of a pass of three
    proc = sdbatch(tmp_path, "reproduce", str(image))
    assert "matches byte for byte" in proc.stdout
    image.write_bytes(png.encode(Image.new("RGB", (64, 64)), "x",
                                 png.read_recipe(image)))
    proc = sdbatch(tmp_path, "reproduce", str(image), check=False)
    assert proc.returncode == 1 and "does not match" in proc.stdout


def test_reproduce_of_a_run_over_a_thousand_images(tmp_path: Path):
    """A PNG keeps no run settings: reproduce allows the job's own image count (its run
    did), not run.max_images' default of 1000."""
    run_job({**SMALL, "prompt": "a red house", "params": {**SMALL["params"], "cfg_scale": 7},
             "executor": {"max_batch": 1}}, tmp_path / "r")
    [image] = (tmp_path / "r/images").glob("*.png")
    recipe = png.read_recipe(image)
    recipe["job"]["params"]["seed"] = [11, *range(100, 1100)]  # image 0 of 1001
    image.write_bytes(png.encode(Image.open(image), png.read_text(image)["parameters"],
                                 recipe))
    proc = sdbatch(tmp_path, "reproduce", str(image))
    assert "matches byte for byte" in proc.stdout


def test_reproduce_of_pixels_written_by_another_version_holds(tmp_path: Path):
    """Same pixels, other text (an upgrade changes Version): reproduced, and it says so."""
    run_job({**SMALL, "prompt": "a red house", "params": {**SMALL["params"], "cfg_scale": 7}},
            tmp_path / "r")
    [image] = (tmp_path / "r/images").glob("*.png")
    text = png.read_text(image)["parameters"]
    old = text.replace("Version: sdbatch ", "Version: sdbatch 0.0.1-was-")
    image.write_bytes(png.encode(Image.open(image), old, png.read_recipe(image)))
    proc = sdbatch(tmp_path, "reproduce", str(image))
    assert "pixels match exactly; its metadata differs (written by sdbatch 0.0.1-was-" \
        in proc.stdout


def test_reproduce_into_the_image_itself_compares_with_what_was_there(tmp_path: Path):
    run_job({**SMALL, "prompt": "a red house", "params": {**SMALL["params"], "cfg_scale": 7}},
            tmp_path / "r")
    [image] = (tmp_path / "r/images").glob("*.png")
    made = image.read_bytes()
    image.write_bytes(png.encode(Image.new("RGB", (64, 64)), "x", png.read_recipe(image)))
    proc = sdbatch(tmp_path, "reproduce", str(image), "--out", str(image), check=False)
    assert proc.returncode == 1 and "does not match" in proc.stdout
    assert image.read_bytes() == made  # the render, written as asked


def test_reproduce_on_another_device_compares_within_tolerance(tmp_path: Path):
    """An image said to be made elsewhere: reproduce says so, and accepts pixels within the
    stated tolerance (not bytes); a different picture still fails."""
    run_job({**SMALL, "prompt": "a red house", "params": {**SMALL["params"], "cfg_scale": 7}},
            tmp_path / "r")
    [image] = (tmp_path / "r/images").glob("*.png")
    recipe = png.read_recipe(image)
    recipe["recipe"]["device"]["device_name"] = "another-chip"
    text = png.read_text(image)["parameters"]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[::2] = np.clip(pixels[::2].astype(int) + 3, 0, 255)  # mean 1.5 levels off
    image.write_bytes(png.encode(Image.fromarray(pixels), text, recipe))
    proc = sdbatch(tmp_path, "reproduce", str(image))
    assert "was made on cpu (another-chip)" in proc.stdout
    assert "reproduced within tolerance on another device" in proc.stdout
    image.write_bytes(png.encode(Image.new("RGB", (64, 64)), text, recipe))
    proc = sdbatch(tmp_path, "reproduce", str(image), check=False)
    assert proc.returncode == 1 and "does not match" in proc.stdout


def test_lego_building_end_to_end(tmp_path: Path):
    """The README's main command, on the shipped job, as a user runs it."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "jobs", tmp_path / "jobs")
    proc = sdbatch(tmp_path, "+job=lego_building", "run.progress=quiet")
    assert "lego_building: 6 images (2 zip(prompt, seed) x 3 cfg_scale)" in proc.stdout
    [run_dir] = list((tmp_path / "outputs/lego_building").iterdir())
    names = sorted(p.name for p in (run_dir / "images").iterdir())
    assert names == ["00000-1234.png", "00001-1234.png", "00002-1234.png",
                     "00003-5678.png", "00004-5678.png", "00005-5678.png"]
    params = parse_infotext(png.read_text(run_dir / "images" / names[4])["parameters"])[2]
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["CFG scale"] == "7" and params["Size"] == "64x64"
    assert params["Hires upscale"] == "2" and params["Mask blur"] == "4"
    assert params["SD upscale upscaler"] == "2x-tiny-Compact"
    assert "Module: canny, Model: control_tiny_canny" in params["ControlNet 0"]
    assert Image.open(run_dir / "images" / names[4]).size == (256, 256)
    entry = json.loads((run_dir / "manifest.jsonl").read_text().splitlines()[4])
    assert [s["kind"] for s in entry["recipe"]["stages"]] == ["txt2img", "hires_fix", "inpaint",
                                                            "sd_upscale"]
    assert not (run_dir / "intermediates").exists()


def test_quiet_mode_prints_no_bars(tmp_path: Path):
    write_job(tmp_path, "small", SMALL_JOB)
    proc = sdbatch(tmp_path, "+job=small")
    assert "it/s" not in proc.stderr and "img/s" not in proc.stderr
    assert "complete: 4 rendered" in proc.stdout


NO_NETWORK = """import socket, sys
sys.path.insert(0, {repo!r})
def refuse(*a, **k):
    sys.stderr.write("NETWORK ATTEMPT %r\\n" % (a,))
    raise OSError("network is off in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from sdbatch.cli import main
main()
"""


def test_a_job_runs_with_no_network_and_no_offline_setting(tmp_path: Path):
    """Nothing is downloaded: with the Hugging Face offline switches unset and every socket
    refused, the job runs and nothing even tries to connect."""
    write_job(tmp_path, "small", SMALL_JOB.replace('["a red house", "a blue tower"]',
                                                   '"a red house"').replace("[5, 7]", "5"))
    script = tmp_path / "no_network.py"
    script.write_text(NO_NETWORK.format(repo=str(Path(__file__).resolve().parents[1])))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: nothing to fall back on
    proc = subprocess.run([sys.executable, str(script), "+job=small", "run.dir=r"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "NETWORK ATTEMPT" not in proc.stderr
    assert len(shas(tmp_path / "r")) == 1


def test_the_summary_gives_counts_rate_grids_and_gallery(tmp_path: Path, capsys):
    assert run_job(SMALL, tmp_path / "r") == 0
    out = capsys.readouterr().out
    last = out.splitlines()[-3:]
    assert last[0].startswith("complete: 4 rendered, 0 already there, 0 failed, in ")
    assert " images/s -> " in last[0]
    assert last[1].startswith("  grids: grids/") and last[2] == \
        f"  gallery: {tmp_path / 'r' / 'index.html'}"
    sheets = json.loads((tmp_path / "r" / "run.json").read_text())["grids"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert sheets and all(sheet in page for sheet in sheets)  # the gallery links them


def test_the_bar_shows_the_stage_and_stack_of_the_batch_started():
    from sdbatch.progress import Progress

    progress = Progress("bar", 10)
    progress.stage("hires_fix", "tiny")
    assert "hires_fix on tiny" in str(progress.images)
    progress.stage("upscale", "")
    assert str(progress.images).rstrip().endswith("upscale]")
    progress.close()


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_a_run_dir_that_is_or_lies_in_a_file_is_a_problem_not_a_traceback(tmp_path, where):
    from sdbatch.schema import JobError

    (tmp_path / "afile").write_text("x")
    job = validate({"prompt": "a house", "params": {"steps": 1, "width": 64, "height": 64},
                    "run": {"dir": str(tmp_path / where)}})
    with pytest.raises(JobError, match=r"run\.dir .*afile is a file, so .* cannot be the "
                                       r"run's folder"):
        runner.prepare(job, lambda key: "test")
