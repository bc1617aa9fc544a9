"""X/Y/Z plot sheets: the layout maths on its own, then a 2x2 run of the tiny model (rendered
once for the module) drawn whole, and drawn again as a kill and a failure would leave it."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch import matrix
from sdbatch import run as runner
from sdbatch.output.run_folder import made_of
from sdbatch.reports import grids
from sdbatch.schema import JobError, validate

LONG = ["LegoAlrev, a LEGO brick office headquarters building, lawn, blue sky",
        "LegoAlrev, a LEGO brick headquarters tower at night, city lights"]
JOB = {"prompt": LONG, "negative_prompt": "blurry",
       "params": {"sampler": "Euler a", "steps": 2, "cfg_scale": [5, 7], "seed": 11,
                  "width": 64, "height": 64}}


@pytest.fixture(scope="module")
def run_2x2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grids") / "run"
    raw = {**JOB, "run": {"dir": str(folder), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == runner.EXIT_OK
    return folder


def test_long_prompts_are_shortened_to_what_differs():
    short, start, end = grids.shorten(LONG)
    assert short == ["… office headquarters building, lawn, blue sky",
                     "… headquarters tower at night, city lights"]
    assert start == "LegoAlrev, a LEGO brick" and end == ""
    assert grids.shorten(["a red house", "a blue house"])[0] == ["a red house", "a blue house"]
    ends = ["a photo of a red brick house by the sea at dawn",
            "a photo of a tall glass tower by the sea at dawn"]
    short, start, end = grids.shorten(ends)
    assert short == ["… red brick house …", "… tall glass tower …"]
    assert (start, end) == ("a photo of a", "by the sea at dawn")
    # every text keeps a word of its own, even one that is the others' start
    short, _, _ = grids.shorten(["a house on a hill in summer", "a house on a hill in summer, red"])
    assert all(s.strip("… ") for s in short)


def test_labels_use_the_webui_words():
    assert [grids.label(k) for k in ("params.cfg_scale", "prompt", "post.0.hires_fix.denoise",
                                     "post.2.inpaint.mask_blur", "controlnet.0.weight",
                                     "post.1.img2img.controlnet.1.weight")] == [
        "CFG scale", "Prompt", "Hires fix denoise", "Inpaint mask blur (step 3)",
        "ControlNet 0 weight", "Img2img ControlNet 1 weight (step 2)"]
    assert grids.value_text("params.cfg_scale", 7.0) == "7"
    assert grids.value_text("init_image", "/data/in/cat.png") == "cat.png"


def test_default_axes_are_the_two_longest_the_others_sheets():
    # lengths by matrix position: the inner of the two longest gives the columns
    assert grids.pick_axes([1, 2, 3, 1, 4]) == (4, 2, [1])
    assert grids.pick_axes([3, 3]) == (1, 0, [])
    assert grids.pick_axes([1, 5]) == (1, None, [])
    assert grids.pick_axes([2, 3, 4], x=0) == (0, 2, [1])
    assert grids.pick_axes([2, 3, 4], z=2) == (1, 0, [2])
    assert grids.pick_axes([2, 3, 4], x=0, y=1) == (0, 1, [2])


@pytest.mark.parametrize("cols,rows,w,h,bands,budget", [
    (2, 2, 64, 64, (50, 40), 1e6),  # fits: full size
    (10, 10, 1024, 1024, (300, 200), 16e6),
    (3, 7, 512, 768, (400, 120), 2e6),
])
def test_thumbnails_shrink_to_the_pixel_budget(cols, rows, w, h, bands, budget):
    s = grids.sheet_scale(cols, rows, w, h, *bands, budget)
    assert 0 < s <= 1
    area = (bands[0] + cols * int(w * s)) * (bands[1] + rows * int(h * s))
    assert area <= budget
    if s < 1:  # and not needlessly small: one pixel more per cell breaks the budget
        assert (bands[0] + cols * (w * s + 1)) * (bands[1] + rows * (h * s + 1)) > budget


def test_a_sheet_with_its_labels_stays_within_budget():
    axes = [grids.GridAxis(("prompt",), tuple((p,) for p in LONG * 3)),
            grids.GridAxis(("params.cfg_scale",), tuple((float(c),) for c in range(8)))]
    cells = [[grids.Cell(0, None, "missing")] * 8 for _ in range(6)]
    sheet = grids.Sheet(axes[1], axes[0], [], cells)
    legend = grids.legend_lines(sheet, 1, 1)
    for budget in (4e6, 1e6):
        lay = grids.layout(sheet, legend, 1024, 1024, budget)
        assert lay.size[0] * lay.size[1] <= budget
        assert lay.cell_w < 1024 and lay.cell_w == lay.cell_h


def test_an_image_index_is_its_place_in_the_matrix():
    """The mixed-radix recovery of each image's axis values agrees with matrix.expand, zip
    groups and the images of a cell included."""
    job = matrix.resolve_seeds(validate({
        "prompt": ["a red house", "a blue tower", "a white house"], "zip": [["prompt", "seed"]],
        "params": {"cfg_scale": [5, 7], "seed": [1, 2, 3], "steps": [2, 3], "batch_count": 2,
                   "width": 64, "height": 64}}), 0)
    axes = grids.run_axes(job)
    lengths = [len(a.values) for a in axes]
    assert [(a.keys, len(a.values)) for a in axes if len(a.values) > 1] == [
        (("prompt", "params.seed"), 3), (("params.steps",), 2), (("params.cfg_scale",), 2),
        (("batch",), 2)]
    renders = matrix.expand(job)
    assert len(renders) == 3 * 2 * 2 * 2
    for coords in itertools.product(*(range(n) for n in lengths)):
        r = renders[grids.index_of(list(coords), lengths)]
        got = {k: v for a, c in zip(axes, coords, strict=True)
               for k, v in zip(a.keys, a.values[c], strict=True)}
        assert r.prompt == got["prompt"] and r.steps == got["params.steps"]
        assert r.cfg_scale == got["params.cfg_scale"]
        assert r.seed == got["params.seed"] + got["batch"] - 1  # seeds count up in a cell


def test_the_grid_key_names_axes_the_job_has():
    with pytest.raises(JobError) as e:
        validate({**JOB, "grid": {"x": "steps"}})
    assert "grid.x" in str(e.value) and "its axes: prompt, cfg_scale" in str(e.value)
    with pytest.raises(JobError, match="did you mean 'cfg_scale'"):
        validate({**JOB, "grid": {"y": "cfg_scal"}})
    zipped = {**JOB, "params": {**JOB["params"], "seed": [1, 2]}, "zip": [["prompt", "seed"]]}
    with pytest.raises(JobError, match="'prompt' is the axis grid.x already shows"):
        validate({**zipped, "grid": {"x": "seed", "y": "prompt"}})
    job = validate({**zipped, "grid": {"x": "params.seed", "y": "cfg_scale"}})
    assert job.grid.x == "params.seed"
    # a dynamic prompt may become an axis: it is accepted before it is expanded
    validate({**JOB, "prompt": "a {red|blue} house", "grid": {"x": "prompt"}})


def test_the_grid_key_changes_no_image_and_no_resume():
    job = validate({**JOB, "grid": {"x": "prompt", "max_megapixels": 2}})
    assert "grid" not in runner.portable(job)
    assert "grid" not in made_of(runner.portable(job) | {"grid": {}}, "", {}, {})["job"]


def test_a_2x2_run_has_one_labelled_sheet(run_2x2: Path):
    at_the_end = (run_2x2 / "grids" / "cfg_scale-by-prompt.png").read_bytes()  # the run's
    [path] = grids.write_all(run_2x2)
    assert path.read_bytes() == at_the_end
    assert path == run_2x2 / "grids" / "cfg_scale-by-prompt.png"
    assert json.loads((run_2x2 / "run.json").read_text())["grids"] == [
        "grids/cfg_scale-by-prompt.png"]
    job, _ = grids.load_job(run_2x2)
    axes = grids.run_axes(job)
    entries = {i: {"status": "ok", "file": f"images/{i:05d}-11.png"} for i in range(4)}
    [sheet] = grids.sheets(axes, entries, run_2x2, None, None, None)
    assert sheet.x.labels()[0] == ["CFG scale: 5", "CFG scale: 7"]
    assert sheet.y.labels() == (["Prompt: … office headquarters building, lawn, blue sky",
                                 "Prompt: … headquarters tower at night, city lights"],
                                ["Prompt: '… ' stands for the shared start "
                                 "\"LegoAlrev, a LEGO brick\""])
    lay = grids.layout(sheet, grids.legend_lines(sheet, 1, 1), 64, 64, 16e6)
    with Image.open(path) as im:
        assert im.size == lay.size and (lay.cell_w, lay.cell_h) == (64, 64)
        cells = json.loads(im.text[grids.GRID_CHUNK])["cells"]
        assert [[c["index"] for c in row] for row in cells] == [[0, 1], [2, 3]]
        text = im.text["parameters"]
        sheet_px = np.asarray(im.convert("RGB"))
    with Image.open(run_2x2 / "images/00001-11.png") as first_row_second:
        assert text.startswith(Image.open(run_2x2 / "images/00000-11.png").text["parameters"])
        cell = sheet_px[lay.top:lay.top + 64, lay.left + 64:lay.left + 128]
        assert np.array_equal(cell, np.asarray(first_row_second.convert("RGB")))
    assert 'Script: X/Y/Z plot, X Type: CFG scale, X Values: "5, 7", Y Type: Prompt' in text


def test_an_interrupted_run_gives_a_partial_sheet(run_2x2: Path, tmp_path: Path):
    """As a kill leaves a folder (the last image never written, so no manifest line) and
    with a failed image: grey cells say which."""
    run = tmp_path / "run"
    shutil.copytree(run_2x2, run, ignore=shutil.ignore_patterns("grids"))
    lines = (run / "manifest.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines[:3]]
    (run / entries[1]["file"]).unlink()
    entries[1] = {**entries[1], "status": "failed", "error": "out of memory"}
    (run / "images/00003-11.png").unlink()
    (run / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    [path] = grids.write_all(run, x="prompt", y="cfg_scale")
    assert path.name == "prompt-by-cfg_scale.png"
    with Image.open(path) as im:
        cells = json.loads(im.text[grids.GRID_CHUNK])["cells"]
        px = np.asarray(im.convert("RGB"))
    assert [[c["status"] for c in row] for row in cells] == [["ok", "ok"], ["failed", "missing"]]
    job, _ = grids.load_job(run)
    axes = grids.run_axes(job)
    x, y = grids.position(axes, job, "prompt"), grids.position(axes, job, "cfg_scale")
    [sheet] = grids.sheets(axes, {e["index"]: e for e in entries}, run, x, y, None)
    legend = grids.legend_lines(sheet, 1, 1)
    assert legend[-1] == "Grey: failed, not rendered (as the run folder is now)"
    lay = grids.layout(sheet, legend, 64, 64, 16e6)
    grey = px[lay.top + 64 + 2, lay.left + 64 + 2]  # a corner of the last cell
    assert tuple(grey) == grids.GREY


def test_grid_command_line_names_the_axes_it_has(run_2x2: Path, tmp_path: Path):
    from .conftest import sdbatch

    proc = sdbatch(tmp_path, "grid", str(run_2x2), "--x", "seed", check=False)
    assert proc.returncode == 2
    assert "'seed' is not an axis of this job" in proc.stderr
    assert "its axes: prompt, cfg_scale" in proc.stderr
    out = sdbatch(tmp_path, "grid", str(run_2x2), "--x", "prompt").stdout
    assert out.strip().endswith("prompt-by-cfg_scale.png")


def test_x_values_are_csv_as_the_webuis_plot_reads_them_back():
    """The WebUI parses X/Y/Z values with a CSV reader: a comma or quote means quotes, with
    quotes doubled and the text as it is (no JSON escapes)."""
    import csv
    import io

    axis = grids.GridAxis(("prompt",), (("猫 on a roof, at night",), ('a "red" house',),
                                        ("plain",)))
    text = axis.values_text()
    assert text == '"猫 on a roof, at night", "a ""red"" house", plain'
    row = next(csv.reader(io.StringIO(text), skipinitialspace=True))
    assert row == ["猫 on a roof, at night", 'a "red" house', "plain"]


def test_a_long_row_label_keeps_a_line_for_every_key():
    """A zipped prompt and seed in four lines: the prompt is cut (marked), the seed stays."""
    from sdbatch.reports.grids import fitted

    prompt = ["Prompt: red brick", "building on a", "green lawn under", "a blue sky"]
    assert fitted([prompt, ["Seed: 10"]], 3) == ["Prompt: red brick", "building on a …",
                                                 "Seed: 10"]
    assert fitted([prompt, ["Seed: 10"]], 9) == [*prompt, "Seed: 10"]
    assert fitted([prompt, ["Seed: 10"]], 1) == ["Prompt: red brick …"]  # no room for both


def test_a_long_sheet_title_wraps_inside_the_sheet(run_2x2: Path, monkeypatch):
    """The title is wrapped to the sheet's width and drawn from its left edge: it was drawn
    after the row labels' band, so its right end was cut off."""
    job, _ = grids.load_job(run_2x2)
    entries = {i: {"status": "ok", "file": f"images/{i:05d}-11.png"} for i in range(4)}
    [sheet] = grids.sheets(grids.run_axes(job), entries, run_2x2, None, None, None)
    long = "Seed: 11 · " + "a red brick building with a pointed roof on a lawn " * 3
    monkeypatch.setattr(type(sheet), "title", lambda self: [long])
    legend = grids.legend_lines(sheet, 1, 1)
    lay = grids.layout(sheet, legend, 64, 64, 16e6)
    px = np.asarray(grids.draw(sheet, lay, legend, run_2x2).convert("L"))
    pad = lay.font_px // 3
    title_band = px[:lay.top - lay.font_px * 2]
    assert (title_band[:, -pad:] == title_band[0, -1]).all()  # no ink in the right margin
    assert (title_band < 128).any()  # and the title is there
