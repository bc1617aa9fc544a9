"""`sdbatch verify` and `sdbatch diff` on tiny runs, and their metrics on their own."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from sdbatch import run as runner
from sdbatch.output import png
from sdbatch.reports import compare, diff, verify
from sdbatch.schema import validate

from .conftest import sdbatch

JOB = {"prompt": ["a red house", "a blue tower"], "negative_prompt": "blurry",
       "params": {"sampler": "Euler a", "steps": 2, "cfg_scale": [5, 7], "seed": 11,
                  "width": 64, "height": 64}}


def render(folder: Path, cfg_scale: list[float]) -> Path:
    raw = {**JOB, "params": {**JOB["params"], "cfg_scale": cfg_scale},
           "run": {"dir": str(folder), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return render(tmp_path_factory.mktemp("verify") / "run", [5, 7])


@pytest.fixture
def run(made: Path, tmp_path: Path) -> Path:
    """A copy of the module's run, to tamper with."""
    return Path(shutil.copytree(made, tmp_path / "run"))


def entries(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


def rewrite(run: Path, lines: list[dict]) -> None:
    (run / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def move_pixels(run: Path, index: int, levels: int, rows=slice(None)) -> str:
    """Change image ``index``'s pixels (keeping its metadata) as a regressed render would,
    and record the new file in the manifest, as the run would have."""
    lines = entries(run)
    entry = next(e for e in lines if e["index"] == index)
    file = run / entry["file"]
    pixels = np.asarray(Image.open(file).convert("RGB")).astype(int)
    pixels[rows] = np.clip(pixels[rows] + levels, 0, 255)
    file.write_bytes(png.encode(Image.fromarray(pixels.astype(np.uint8)),
                                png.read_text(file)["parameters"], png.read_recipe(file)))
    entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    rewrite(run, lines)
    return entry["file"]


# the metrics, on their own


def test_psnr_of_one_level_everywhere_and_of_equal_images():
    a = np.zeros((16, 16, 3), np.uint8)
    assert compare.psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # 48.13
    assert compare.psnr(a, a) == math.inf


def test_ssim_of_flat_images_is_the_luminance_term():
    """Flat images have no variance, so SSIM is (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = np.full((32, 32), 100, np.uint8), np.full((32, 32), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert compare.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    assert compare.ssim(a, a) == pytest.approx(1.0)


def _ssim_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004, window by window over the windows inside the image."""
    g = cv2.getGaussianKernel(11, 1.5)
    w = g @ g.T
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            p, q = x[i:i + 11, j:j + 11].astype(float), y[i:i + 11, j:j + 11].astype(float)
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
            cov = (w * (p - mp) * (q - mq)).sum()
            values.append((2 * mp * mq + c1) * (2 * cov + c2)
                          / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_ssim_is_the_gaussian_window_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_ssim_by_definition(x[..., c], y[..., c]) for c in range(3)])
    assert compare.ssim(x, y) == pytest.approx(expected, abs=1e-9)
    assert 0.5 < expected < 0.99  # a value in the middle, where errors would show
    with pytest.raises(ValueError, match="at least 11 pixels"):
        compare.ssim(x[:8], y[:8])


def test_heat_map_shows_one_level_and_leaves_equal_pixels_black():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0], b[3, 3] = 1, 255
    heat = compare.heat_map(a, b)
    assert heat[0, 0].tolist() == [0, 0, 0] and heat[1, 2].sum() > 0
    assert heat[3, 3].sum() > heat[1, 2].sum()


def test_tolerance_is_parsed_with_the_fix_in_its_error():
    assert verify.parse_tolerance("psnr=30") == verify.Tolerance(30.0, verify.Tolerance().ssim)
    assert verify.parse_tolerance("ssim=0.9,psnr=33") == verify.Tolerance(33.0, 0.9)
    for bad in ("30", "psnr=x", "mse=3", "ssim=2"):
        with pytest.raises(ValueError, match="--tolerance"):
            verify.parse_tolerance(bad)


def test_a_sample_is_chosen_by_seed_the_same_in_any_order():
    es = [{"index": i, "seed": 100 + i // 2} for i in range(40)]
    picked = [e["index"] for e in verify.choose(es, 5)]
    assert picked == [e["index"] for e in verify.choose(list(reversed(es)), 5)]
    assert len(picked) == 5 and picked != list(range(5)) and picked == sorted(picked)
    assert len(verify.choose(es, None)) == 40


# verify


def test_verify_of_an_untouched_run_holds_bit_for_bit(run: Path, tmp_path: Path):
    report = verify.verify(run, tmp_path / "report")
    assert report.ok and len(report.checks) == 4
    assert all(c.mode == "exact" and c.distance.same and c.bytes_same for c in report.checks)
    saved = json.loads((tmp_path / "report/report.json").read_text())
    assert saved["ok"] and saved["regressions"] == [] and saved["checked"] == 4
    assert "verified: 4 of 4 hold" in (tmp_path / "report/report.txt").read_text()
    assert not (tmp_path / "report/diffs").exists()


def test_a_moved_image_is_named_with_a_heat_map_and_exit_1(run: Path, tmp_path: Path):
    file = move_pixels(run, 2, 1, rows=slice(0, 8))  # one level, in eight rows
    proc = sdbatch(tmp_path, "verify", str(run), "--out", "report", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL 00002 {file}: exact" in proc.stdout
    assert "the pixels differ where they must be equal" in proc.stdout
    assert f"REGRESSIONS: 3 of 4 hold; 1 moved: 00002 ({file})" in proc.stdout
    saved = json.loads((tmp_path / "report/report.json").read_text())
    assert saved["regressions"] == [2]
    heat = tmp_path / "report" / saved["checks"][2]["heat"]
    assert heat.exists() and Image.open(heat).width > 3 * 64


def test_a_cut_short_first_image_is_a_named_regression_not_a_crash(run: Path,
                                                                   tmp_path: Path):
    """The job comes from an intact image's recipe; the broken one is a regression (exit 1)
    and the others are still checked."""
    first = run / sorted(entries(run), key=lambda e: e["index"])[0]["file"]
    first.write_bytes(first.read_bytes()[:200])
    proc = sdbatch(tmp_path, "verify", str(run), "--out", "report", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot be read as a picture" in proc.stdout
    assert "REGRESSIONS: 3 of 4 hold" in proc.stdout


@pytest.mark.parametrize("executor", [{"name": "multi", "devices": ["cpu", "cpu"]},
                                      {"name": "slurm", "cluster": "local", "shards": 2}])
def test_a_run_made_on_another_executor_verifies_locally(run: Path, tmp_path: Path,
                                                         executor: dict):
    """The executor's own keys (kept in config.yaml) are dropped for the local render."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["executor"] |= executor
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    report = verify.verify(run, tmp_path / "report", sample=1)
    assert report.ok and len(report.checks) == 1


def test_sample_1_verifies_one_image(run: Path, tmp_path: Path):
    report = verify.verify(run, tmp_path / "report", sample=1)
    assert len(report.checks) == 1 and report.ok
    assert report.checks[0].index == verify.choose(entries(run), 1)[0]["index"]
    assert len(list((tmp_path / "report/rendered").iterdir())) == 1


def test_another_thread_count_is_compared_within_the_tolerance(run: Path, tmp_path: Path):
    """Image 1 says it was drawn on 64 threads: its pixels cannot be held to equality, only to
    the tolerance; a one-level move passes there, and fails a tighter tolerance."""
    lines = entries(run)
    lines[1]["recipe"]["device"]["threads"] = 64
    rewrite(run, lines)
    move_pixels(run, 1, 1, rows=slice(0, 8))
    report = verify.verify(run, tmp_path / "report")
    check = report.checks[1]
    assert report.ok and check.mode == "tolerance" and not check.distance.same
    assert check.why_tolerance == [f"torch threads 64 then, {report.machine['threads']} now"]
    assert all(c.mode == "exact" for c in report.checks if c is not check)
    tight = verify.verify(run, tmp_path / "tight", tolerance=verify.Tolerance(psnr=60))
    assert [c.index for c in tight.checks if not c.ok] == [1]
    assert "outside the tolerance (psnr=60,ssim=0.98)" in tight.checks[1].problems


def test_verify_of_an_interrupted_run_checks_what_is_there(run: Path, tmp_path: Path):
    lines = entries(run)
    for e in lines[2:]:
        (run / e["file"]).unlink()
    rewrite(run, lines[:2])
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    report = verify.verify(run, tmp_path / "report")
    assert report.ok and [c.index for c in report.checks] == [0, 1]
    assert "the run is interrupted: verifying the 2 images there of 4" in report.text()


# diff


def test_diff_of_a_run_with_itself_is_identical(made: Path, tmp_path: Path):
    report = diff.diff(made, made, tmp_path / "d")
    assert report.same and not report.job_differs and len(report.pairs) == 4
    assert "4 of the same recipe (4 identical, 0 changed)" in report.text()
    assert not list((tmp_path / "d").glob("sheet-*.png"))


def test_diff_against_another_cfg_scale_names_the_key_and_the_changed_images(
        made: Path, tmp_path: Path):
    other = render(tmp_path / "other", [5, 8])
    proc = sdbatch(tmp_path, "diff", str(made), str(other), "--out", "d", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the jobs differ in: params.cfg_scale ([5.0, 7.0] -> [5.0, 8.0])" in proc.stdout
    saved = json.loads((tmp_path / "d/report.json").read_text())
    near = [p for p in saved["pairs"] if p["how"] == "near"]
    assert [(p["a_index"], p["b_index"]) for p in near] == [(1, 1), (3, 3)]  # the cfg 7 cells
    assert all(p["differs"] == {"params.cfg_scale": [7.0, 8.0]} for p in near)
    assert all(p["distance"]["max_diff"] > 0 and (tmp_path / "d" / p["heat"]).exists()
               for p in near)
    same = [p for p in saved["pairs"] if p["how"] == "same recipe"]
    assert [p["a_index"] for p in same] == [0, 2] and all(
        p["distance"]["max_diff"] == 0 for p in same)
    assert saved["sheets"] == ["sheet-001.png"] and (tmp_path / "d/sheet-001.png").exists()


def test_diff_lists_the_images_on_one_side_only(run: Path, made: Path, tmp_path: Path):
    rewrite(run, entries(run)[:3])  # an interrupted run: image 3 not there yet
    report = diff.diff(made, run, tmp_path / "d")
    assert not report.same and [e["index"] for e in report.only_a] == [3]
    assert not report.only_b and "only in A: images/00003-" in report.text()


def test_diff_of_two_runs_without_images_is_not_identical(tmp_path: Path):
    """A CI diff of two runs whose every image failed must not pass as 'identical'."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
        (tmp_path / name / "manifest.jsonl").write_text(
            json.dumps({"index": 0, "status": "failed", "error": "out of memory"}) + "\n")
    report = diff.diff(tmp_path / "a", tmp_path / "b", tmp_path / "report")
    assert not report.same
    assert "nothing to compare: neither run has an image" in report.text()
