import json
from pathlib import Path

from PIL import Image

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
