"""The gallery (index.html of a run folder), opened from file:// in a real headless Chromium:
the system's (Debian's `chromium`, which .ci/run installs; SDBATCH_CHROMIUM names another),
driven by playwright."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdbatch import run as runner
from sdbatch.output.lock import Holder
from sdbatch.reports import gallery
from sdbatch.schema import validate

from .conftest import sdbatch

PWNED = "<script>window.pwned=1</script> \"quoted\" 'single' <img src=x onerror=window.pwned=2>"
JOB = {"prompt": ["a red house", PWNED], "negative_prompt": "blurry",
       "params": {"sampler": "Euler a", "steps": 2, "cfg_scale": [5, 7], "seed": 11,
                  "width": 64, "height": 64},
       "post": [{"img2img": {"denoise": 0.5}}]}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A tiny job's run folder (2 prompts x 2 cfg_scale, txt2img then img2img), its
    intermediates kept, and its gallery."""
    folder = tmp_path_factory.mktemp("gallery") / "run"
    raw = {**JOB, "run": {"dir": str(folder), "progress": "quiet", "keep_intermediates": True}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    gallery.write(folder)
    return folder


def chromium() -> str:
    found = os.environ.get("SDBATCH_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no Chromium to test the gallery in: install Debian's (apt-get install -y "
                    "chromium, as .ci/run does) or set SDBATCH_CHROMIUM to a Chromium binary")
    return found


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium())
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """Opens a run folder's index.html from file://; fails the test on any script error or
    any request that leaves the folder's files (the page must need no network)."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    errors: list[str] = []

    def load(run_dir: Path):
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: None if r.url.startswith("file://")
                else errors.append(f"network request: {r.url}"))
        page.goto((run_dir / "index.html").as_uri())
        page.wait_for_load_state("load")
        return page

    yield load
    context.close()
    assert not errors


def visible_indexes(page) -> list[int]:
    return [int(i) for i in page.locator(".card:visible").evaluate_all(
        "cards => cards.map(c => c.dataset.index)")]


def loaded(page, selector: str) -> list[int]:
    """naturalWidth of each image the selector finds, once each has loaded (or failed)."""
    images = page.locator(selector)
    for n in range(images.count()):
        images.nth(n).scroll_into_view_if_needed()  # lazy images load once in view
    return images.evaluate_all("""images => Promise.all(images.map(i => i.complete
        ? i.naturalWidth
        : new Promise(done => ["load", "error"].forEach(
              e => i.addEventListener(e, () => done(i.naturalWidth))))))""")


def test_gallery_filters_sorts_and_compares_in_chromium(real_run: Path, open_page,
                                                         tmp_path: Path):
    page = open_page(real_run)
    assert visible_indexes(page) == [0, 1, 2, 3]
    assert loaded(page, ".card:visible .thumb img") == [64] * 4
    axes = page.locator("select[data-axis]").evaluate_all("s => s.map(x => x.dataset.axis)")
    assert axes == ["prompt", "params.cfg_scale"]  # what varies; steps, seed... do not

    page.select_option('select[data-axis="prompt"]', label="a red house")
    assert visible_indexes(page) == [0, 1]
    assert page.locator("#count").text_content() == "2 shown of 4"
    page.select_option('select[data-axis="params.cfg_scale"]', label="7")
    assert visible_indexes(page) == [1]
    page.select_option('select[data-axis="prompt"]', label="all")
    assert visible_indexes(page) == [1, 3]
    page.select_option('select[data-axis="params.cfg_scale"]', label="all")

    page.select_option("#sort", "params.cfg_scale")
    page.check("#desc")
    assert visible_indexes(page) == [1, 3, 0, 2]  # cfg 7 first, then by index

    page.click('.card[data-index="0"] .pick')
    assert page.locator("#compare").is_hidden()
    page.click('.card[data-index="3"] .pick')
    compare = page.locator("#compare")
    assert compare.is_visible()
    assert loaded(page, "#compare .side img") == [64, 64]
    rows = compare.locator("tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert ["params.cfg_scale", "5", "7"] in rows
    assert ["params.prompt", "a red house", PWNED] in rows
    shot = tmp_path / "compare.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    page.reload()  # the view (filters, sort, comparison) is kept in the URL across reloads
    assert page.locator("#compare").is_visible() and page.is_checked("#desc")
    page.keyboard.press("Escape")
    assert page.locator("#compare").is_hidden()


def test_a_prompt_with_script_and_quotes_shows_as_text(real_run: Path, open_page):
    page = open_page(real_run)
    assert page.evaluate("typeof window.pwned") == "undefined"
    values = page.locator('.card[data-index="2"] .value').all_text_contents()
    assert f"prompt: {PWNED}" in values
    page.click('.card[data-index="2"] .details')
    rows = page.locator("#detail tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert ["prompt", PWNED] in rows
    assert json.dumps(PWNED) in page.locator("#detail pre.recipe").text_content()
    assert page.locator("#detail script, #gallery script, #gallery img[src='x']").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"


def test_details_show_the_chain_with_its_kept_base_picture(real_run: Path, open_page):
    page = open_page(real_run)
    page.click('.card[data-index="1"] .details')
    chain = page.locator("#detail ol.chain > li")
    assert chain.count() == 2
    assert chain.nth(0).locator("strong").text_content() == "txt2img"
    assert chain.nth(1).locator("strong").text_content() == "img2img"
    base = json.loads((real_run / "manifest.jsonl").read_text().splitlines()[1])
    key = base["recipe"]["stages"][0]["key"]
    assert chain.nth(0).locator("a").get_attribute("href") == f"intermediates/{key}.png"
    assert loaded(page, "#detail ol.chain img") == [64, 64]


def interrupted_copy(real_run: Path, folder: Path) -> Path:
    """The real run as a kill would leave it: two images written (one under a name that
    needs escaping in a URL), one failed, a manifest line torn, a partial grid, run.json
    still saying running, no lock note."""
    shutil.copytree(real_run, folder)
    (folder / "index.html").unlink()
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    first, second, third = (json.loads(x) for x in lines[:3])
    odd = "images/a #1 ?%20&.png"
    (folder / first["file"]).rename(folder / odd)
    first["file"] = odd
    third = {**third, "status": "failed", "error": "CUDA out of memory <b>bold</b>"}
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in (first, second, third))
                                           + "\n" + lines[3][:40])
    shutil.rmtree(folder / "grids", ignore_errors=True)  # the run's own sheets: one partial
    (folder / "grids").mkdir()
    shutil.copy(folder / second["file"], folder / "grids" / "partial grid #1.png")
    info = json.loads((folder / "run.json").read_text())
    info["status"] = "running"
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def test_the_gallery_of_an_interrupted_run_shows_what_exists(real_run: Path, open_page,
                                                             tmp_path: Path):
    folder = interrupted_copy(real_run, tmp_path / "run")
    sdbatch(tmp_path, "gallery", str(folder))
    page = open_page(folder)
    assert visible_indexes(page) == [0, 1, 2]
    state = page.locator("#state").text_content()
    assert state.startswith("interrupted: 2 of 4 images, 1 failed, 1 not rendered yet")
    assert f"sdbatch resume {folder.name}" in state
    assert loaded(page, '.card[data-index="0"] .thumb img') == [64]  # the odd name loads
    assert page.locator("#grids a").get_attribute("href") == "grids/partial%20grid%20%231.png"
    assert loaded(page, "#grids img") == [64]
    page.select_option("#status", "failed")
    assert visible_indexes(page) == [2]
    assert page.locator('.card[data-index="2"] .failed').text_content() == \
        "failed: CUDA out of memory <b>bold</b>"


def test_gallery_of_a_folder_that_is_no_run_is_refused(tmp_path: Path):
    proc = sdbatch(tmp_path, "gallery", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not an sdbatch run folder (no run.json)" in proc.stderr


def test_run_state_tells_a_killed_run_from_a_running_one():
    here = Holder(123, "box", "t")
    alive = lambda pid: pid == 123  # noqa: E731
    assert gallery.run_state({"status": "complete"}, None, "box", alive) == "complete"
    assert gallery.run_state({"status": "running"}, here, "box", alive) == "running"
    assert gallery.run_state({"status": "running"}, here, "box", lambda pid: False) == \
        "interrupted"
    assert gallery.run_state({"status": "running"}, None, "box", alive) == "interrupted"
    assert gallery.run_state({"status": "running"}, Holder(9, "node7", "t"), "box", alive) == \
        "running on node7"
    assert gallery.run_state({}, None, "box", alive) == "starting"


def test_embedded_data_cannot_end_its_script_block():
    text = gallery.embed({"p": "</script><!--<script>&\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"p": "</script><!--<script>&\u2028"}


def test_axes_are_what_varies_in_the_job_s_own_keys():
    def recipe(cfg, denoise, prompt="a cat"):
        base = {"prompt": prompt, "cfg_scale": cfg, "seed": 1, "loras": []}
        return {"model": {"name": "tiny"}, "params": base, "stages": [
            {"kind": "txt2img", "key": "a", "params": base},
            {"kind": "hires_fix", "key": "b", "params": {
                "denoise": denoise, "cfg_scale": cfg, "prompt": prompt, "output_size": [cfg, 8],
                "upscaler_model": {"name": "x", "sha256": str(cfg)}}}]}

    flat = [gallery.flatten(recipe(c, d)) for c in (7, 5) for d in (0.3, 0.5)]
    assert gallery.find_axes(flat) == {"params.cfg_scale": [5, 7],
                                       "post.0.hires_fix.denoise": [0.3, 0.5]}
    assert gallery.flatten(recipe(5, 0.3))["params.loras"] == "[]"


def test_updater_writes_at_once_then_at_most_every_interval(monkeypatch, tmp_path: Path):
    written, now = [], [0.0]
    monkeypatch.setattr(gallery, "write", lambda run_dir: written.append(now[0]))
    update = gallery.Updater(tmp_path, every_s=30, clock=lambda: now[0])
    for t in (0, 10, 29, 31, 40, 62):
        now[0] = t
        update()
    update(force=True)
    assert written == [0, 31, 62, 62]


def test_the_chain_links_the_init_image_mask_and_control_map(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "job" / "run"
    (run_dir / "controlnet").mkdir(parents=True)
    (run_dir / "controlnet" / "m1.png").write_bytes(b"png")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "lawn mask.png").write_bytes(b"png")
    stages = [{"kind": "image", "key": "a", "params": {"path": "/nowhere/hq.png"}},
              {"kind": "inpaint", "key": "b", "params": {
                  "mask": "assets/lawn mask.png",
                  "controlnet": [{"image": "assets/lawn mask.png", "map": "m1"}]}}]
    base, paint = gallery.chain(run_dir, stages, "images/00000-1.png")
    assert base["inputs"] == [{"label": "init image", "path": "/nowhere/hq.png", "src": None}]
    assert not base["kept"] and paint["picture"] == "images/00000-1.png"
    assert [(i["label"], i["src"]) for i in paint["inputs"]] == [
        ("mask", "../../../assets/lawn%20mask.png"),
        ("ControlNet 0 image", "../../../assets/lawn%20mask.png"),
        ("ControlNet 0 control map", "controlnet/m1.png")]
    # `sdbatch gallery` from another folder: relative inputs are the start folder's
    (run_dir / "run.json").write_text(json.dumps({"seed_nonce": 1,
                                                  "sessions": [{"cwd": str(tmp_path)}]}))
    monkeypatch.chdir(run_dir)
    _, paint = gallery.chain(run_dir, stages, "images/00000-1.png")
    assert paint["inputs"][0]["src"] == "../../../assets/lawn%20mask.png"
    # a start folder not on this machine: the current folder, as before
    (run_dir / "run.json").write_text(json.dumps({"seed_nonce": 1,
                                                  "sessions": [{"cwd": "/nowhere/here"}]}))
    monkeypatch.chdir(tmp_path)
    _, paint = gallery.chain(run_dir, stages, "images/00000-1.png")
    assert paint["inputs"][0]["src"] == "../../../assets/lawn%20mask.png"


def test_an_image_whose_file_was_deleted_is_missing_not_ok(real_run: Path, tmp_path: Path):
    """The gallery (and `sdbatch ls`) say what the folder holds now."""
    from sdbatch.reports import listing

    folder = tmp_path / "run"
    shutil.copytree(real_run, folder)
    first = sorted((folder / "images").iterdir())[0]
    first.unlink()
    data = gallery.collect(folder)
    gone = [im for im in data["images"] if im["file"] == f"images/{first.name}"]
    assert [im["status"] for im in gone] == ["missing"]
    assert "sdbatch resume" in gone[0]["error"]
    assert data["run"]["done"] == 3 and data["run"]["missing"] == 1
    assert listing.read_run(folder).ok == 3
