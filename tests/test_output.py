import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from sdbatch import atomic
from sdbatch.output import filenames, manifest, png
from sdbatch.output.infotext import format_infotext, parse_infotext, quote


def test_infotext_is_the_webui_format():
    text = format_infotext("a house, (red:1.2)", "blurry", {
        "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": 123, "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5",
        "Clip skip": None, "Version": "sdbatch 0.1.0"})
    assert text == ("a house, (red:1.2)\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
                    "Seed: 123, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, "
                    "Version: sdbatch 0.1.0")


def test_negative_line_is_omitted_when_empty_and_values_are_quoted():
    text = format_infotext("p", "", {"Steps": 4, "Lora hashes": "a: 1, b: 2"})
    assert text == 'p\nSteps: 4, Lora hashes: "a: 1, b: 2"'
    assert quote("plain") == "plain" and quote("a:b") == '"a:b"'


def test_infotext_reads_back():
    text = format_infotext("line one\nline two", "neg\nmore", {
        "Steps": 4, "Sampler": "Euler a", "Lora hashes": "x: abc, y: def", "Seed": 9})
    prompt, negative, params = parse_infotext(text)
    assert prompt == "line one\nline two" and negative == "neg\nmore"
    assert params == {"Steps": "4", "Sampler": "Euler a", "Lora hashes": "x: abc, y: def",
                      "Seed": "9"}


def test_png_carries_parameters_and_recipe(tmp_path: Path):
    data = png.encode(Image.new("RGB", (8, 8)), "p\nSteps: 1", {"a": [1, 2]})
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert png.read_text(path)["parameters"] == "p\nSteps: 1"
    assert png.read_recipe(path) == {"a": [1, 2]}
    assert data == png.encode(Image.new("RGB", (8, 8)), "p\nSteps: 1", {"a": [1, 2]})


def test_file_names_are_safe_everywhere():
    assert filenames.safe('a<b>:c"d/e\\f|g?h*') == "a_b__c_d_e_f_g_h_"
    assert filenames.safe("CON") == "_CON"
    assert filenames.safe("name. ") == "name"
    assert len(filenames.safe("x" * 500).encode()) <= filenames.MAX_BYTES


def test_file_name_pattern():
    class R:
        index, seed, prompt, sampler, schedule_type = 3, 1234, "A red: house!", "Euler a", "K"
        steps, cfg_scale, width, height = 20, 7.0, 64, 64

    ctx = {"job": "j", "model_name": "m"}
    assert filenames.file_name("[index]-[seed]", R, ctx) == "00003-1234.png"
    assert filenames.file_name("[index]-[prompt_words]-[cfg]", R, ctx) == \
        "00003-A red house-7.png"
    assert filenames.check_pattern("[index]") is None
    assert "needs at least one tag" in filenames.check_pattern("fixed")


def test_manifest_drops_a_torn_line_and_cuts_it_before_appending(tmp_path: Path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"index": 0, "status": "ok"}) + "\n" + '{"index": 1, "sta')
    assert list(manifest.read(path)) == [0]
    m = manifest.Manifest(path)
    m.append({"index": 2, "status": "ok"})
    m.compact()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 2]


def test_manifest_line_cut_just_before_its_newline_is_kept(tmp_path: Path):
    """read() counts a whole line without its newline, so the next append must keep it (a
    resume skipped that image, and cutting the line then lost it from the manifest)."""
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"index": 0}) + "\n" + json.dumps({"index": 1}))
    assert list(manifest.read(path)) == [0, 1]
    manifest.Manifest(path).append({"index": 2})
    assert list(manifest.read(path)) == [0, 1, 2]
    assert path.read_text().count("\n") == 3


def test_manifest_line_torn_inside_a_multibyte_character(tmp_path: Path):
    """A kill can cut a line between the bytes of one character: reading must not crash,
    and the next line starts on a fresh line."""
    path = tmp_path / "manifest.jsonl"
    whole = json.dumps({"index": 0, "prompt": "maison rouge é"}, ensure_ascii=False) + "\n"
    torn = json.dumps({"index": 1, "prompt": "tour bleue 東京"}, ensure_ascii=False).encode()
    cut = torn[:torn.index("東".encode()) + 1]  # one byte of a three-byte character
    path.write_bytes(whole.encode() + cut)
    assert list(manifest.read(path)) == [0]
    m = manifest.Manifest(path)
    m.append({"index": 2, "prompt": "x"})
    lines = path.read_bytes().split(b"\n")
    assert [json.loads(x)["index"] for x in lines if x] == [0, 2]
    assert manifest.read(path)[0]["prompt"] == "maison rouge é"


def test_a_rename_refused_for_a_moment_on_windows_is_tried_again(tmp_path: Path, monkeypatch):
    """Windows refuses to replace a file another process has open (a reader of run.json):
    the write waits for it, a few times, instead of failing the run."""
    real, refusals = os.replace, []

    def busy(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "The process cannot access the file")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", busy)
    monkeypatch.setattr(atomic.time, "sleep", lambda s: None)
    target = tmp_path / "run.json"
    monkeypatch.setattr(atomic, "WINDOWS", True)
    atomic.write_text(target, "{}")
    assert target.read_text() == "{}" and len(refusals) == 2
    monkeypatch.setattr(atomic, "WINDOWS", False)  # elsewhere it is a real refusal
    refusals.clear()
    with pytest.raises(PermissionError):
        atomic.write_text(target, "{1}")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp left


def test_a_run_folder_sweeps_old_temps_from_its_own_files_too(tmp_path: Path):
    from sdbatch.output.run_folder import RunFolder

    folder = RunFolder.create(tmp_path / "r", {"job": {}}, [], 1, 0, {})
    old = [folder.path / ".run.json.x.tmp", folder.path / ".manifest.jsonl.y.tmp",
           folder.images / ".00000.png.z.tmp"]
    (folder.path / "grids").mkdir()
    old.append(folder.path / "grids" / ".grid.png.w.tmp")
    young = folder.path / ".run.json.v.tmp"  # another task's write in flight
    for f in [*old, young]:
        f.write_bytes(b"")
    stale = time.time() - atomic.STALE_TEMP_S - 10
    for f in old:
        os.utime(f, (stale, stale))
    RunFolder(folder.path)
    assert not any(f.exists() for f in old) and young.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_atomic_files_have_the_modes_the_umask_gives_not_owner_only(tmp_path: Path):
    """mkstemp makes 0600 files: a gallery served by another user, or a teammate, could not
    read a run folder's images."""
    mask = os.umask(0)
    os.umask(mask)
    atomic.write_text(tmp_path / "run.json", "{}")
    (tmp_path / "plain.txt").write_text("{}")  # what open() gives under this umask
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == \
        (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~mask
