"""Model stacks as jobs use them: names under paths.models, single files, LoRA / embedding /
hypernetwork from the stack and from prompt tags, hashes in the infotext."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch import run as runner
from sdbatch.models import stack as stacks
from sdbatch.models.hypernetwork import write_a1111_hypernetwork
from sdbatch.models.ldm_export import save_single_file
from sdbatch.output import png
from sdbatch.output.infotext import parse_infotext
from sdbatch.schema import JobError, validate

BASE = {"negative_prompt": "blurry",
        "params": {"sampler": "Euler", "steps": 3, "seed": 5, "width": 64, "height": 64}}


def run_job(raw: dict, folder: Path) -> list[dict]:
    raw = {**BASE, **raw, "run": {"dir": str(folder), "progress": "quiet"}}
    assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(folder: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / entry["file"]), dtype=int)


def infotext(folder: Path, entry: dict) -> dict[str, str]:
    return parse_infotext(png.read_text(folder / entry["file"])["parameters"])[2]


def test_lora_weights_from_prompt_tags_share_one_loaded_stack(tmp_path, monkeypatch):
    loads = []
    real = stacks.load
    monkeypatch.setattr(stacks, "load", lambda spec, device: loads.append(1) or
                        real(spec, device))
    entries = run_job({"prompt": ["a house <lora:LegoAlrev:0>", "a house <lora:LegoAlrev:1>",
                                  "a house"]}, tmp_path / "r")
    assert len(loads) == 1
    zero, one, none = (pixels(tmp_path / "r", e) for e in entries)
    assert np.abs(zero - none).max() <= 1 and np.abs(one - none).max() > 3
    info = infotext(tmp_path / "r", entries[1])
    assert info["Lora hashes"].startswith("LegoAlrev: ") and len(info["Lora hashes"]) == 23
    assert "Lora hashes" not in infotext(tmp_path / "r", entries[2])
    assert entries[0]["key"] != entries[1]["key"]
    assert entries[1]["recipe"]["params"]["prompt"] == "a house <lora:LegoAlrev:1>"


def test_split_lora_weights_from_tags_and_model_loras_render_alike(tmp_path):
    tags = run_job({"prompt": ["a house <lora:LegoAlrev:0:1>",
                               "a house <lyco:LegoAlrev:te=1:unet=0>",
                               "a house <lora:LegoAlrev:1>"]}, tmp_path / "t")
    unet_part, te_part, whole = (pixels(tmp_path / "t", e) for e in tags)
    assert min(np.abs(a - b).max() for a, b in
               ((unet_part, te_part), (unet_part, whole), (te_part, whole))) > 0
    # the same text once the tag is removed ("a house "), the split given by model.loras
    stack = run_job({"prompt": "a house ", "model": {"loras": [
        {"name": "LegoAlrev", "te_weight": 0, "unet_weight": 1}]}}, tmp_path / "s")
    assert np.array_equal(pixels(tmp_path / "s", stack[0]), unet_part)
    prompt = parse_infotext(png.read_text(tmp_path / "s" / stack[0]["file"])["parameters"])[0]
    assert prompt == "a house <lora:LegoAlrev:0:1>"
    assert infotext(tmp_path / "t", tags[1])["Lora hashes"].startswith("LegoAlrev: ")
    assert stack[0]["recipe"]["model"]["loras"][0][:2] == ["LegoAlrev", [0.0, 1.0]]


def test_stack_lora_embedding_and_hypernetwork(tmp_path):
    models = tmp_path / "models"
    write_a1111_hypernetwork(models / "hypernetworks" / "toon.pt", 64, seed=3, scale=2.0)
    entries = run_job({"prompt": ["a nightsky house", "a house"],
                       "paths": {"models": str(models)},
                       "model": {"loras": [{"name": "LegoAlrev", "weight": 0.5}],
                                 "embeddings": ["nightsky"],
                                 "hypernetworks": [{"name": "toon", "weight": 1.0}]}},
                      tmp_path / "r")
    info = infotext(tmp_path / "r", entries[0])
    assert info["TI hashes"].startswith("nightsky: ")
    assert "TI hashes" not in infotext(tmp_path / "r", entries[1])
    assert info["Lora hashes"].startswith("LegoAlrev: ")
    # the WebUI knows a hypernetwork only by its tag in the prompt (it writes no Hypernet key)
    prompt = parse_infotext(png.read_text(tmp_path / "r" / entries[0]["file"])["parameters"])[0]
    assert prompt.endswith("<hypernet:toon:1>") and "Hypernet" not in info
    plain = run_job({"prompt": ["a nightsky house", "a house"]}, tmp_path / "plain")
    assert not np.array_equal(pixels(tmp_path / "r", entries[0]),
                              pixels(tmp_path / "plain", plain[0]))


def test_unknown_networks_fail_before_any_work(tmp_path):
    raw = {**BASE, "prompt": "a house <lora:LegoAlrv:1> <hypernet:nope:1>",
           "model": {"embeddings": ["nigthsky"]}, "run": {"dir": str(tmp_path / "r")}}
    with pytest.raises(JobError) as e:
        runner.run(validate(raw), lambda key: "jobs/x.yaml", [], [])
    text = str(e.value)
    assert "no lora named 'LegoAlrv'" in text and "LegoAlrev" in text
    assert "no hypernetwork named 'nope'" in text
    assert "model.embeddings" in text and "nightsky" in text
    assert not (tmp_path / "r").exists()


def test_single_file_checkpoint_by_name_under_paths_models(tmp_path, tiny_stack, tiny_spec):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    save_single_file(tiny_stack.pipe, models / "Stable-diffusion" / "tinyfile.safetensors")
    entries = run_job({"prompt": "a house", "paths": {"models": str(models)},
                       "model": {"checkpoint": "tinyfile", "config": str(tiny_spec.path)}},
                      tmp_path / "r")
    folder = run_job({"prompt": "a house"}, tmp_path / "folder")
    assert np.abs(pixels(tmp_path / "r", entries[0]) -
                  pixels(tmp_path / "folder", folder[0])).max() <= 1
    info = infotext(tmp_path / "r", entries[0])
    assert info["Model"] == "tinyfile" and len(info["Model hash"]) == 10


def test_checkpoint_axis_loads_each_stack_once(tmp_path, tiny_stack, tiny_spec, monkeypatch):
    loads = []
    real = stacks.load
    monkeypatch.setattr(stacks, "load", lambda spec, device: loads.append(spec.name) or
                        real(spec, device))
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    save_single_file(tiny_stack.pipe, models / "Stable-diffusion" / "copy.safetensors")
    entries = run_job({"prompt": "a house", "paths": {"models": str(models)},
                       "params": {**BASE["params"], "seed": [1, 2], "batch_size": 1},
                       "model": {"checkpoint": ["tiny", "copy"], "config": str(tiny_spec.path)}},
                      tmp_path / "r")
    assert [e["recipe"]["model"]["name"] for e in entries] == ["tiny", "tiny", "copy", "copy"]
    assert loads == ["tiny", "copy"]  # one load each
