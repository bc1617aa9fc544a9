"""control_tiny_canny: its training recipe (a few steps write a file sdbatch loads) and its
proof, which the base model cannot give: canny edges of a building drawn at the left put
the building at the left, at the right on the right. The semantic test needs the trained
file (python -m sdbatch.tiny_train, or .controlnet for it alone); it is skipped only while
that is absent."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdbatch import run as runner
from sdbatch.models import controlnet, tiny
from sdbatch.schema import validate
from sdbatch.tiny_train import scenes
from sdbatch.tiny_train.controlnet import NAME, POSITION_CLAUSES, caption, control_map, main

SHIPPED = tiny.family_models() / "ControlNet" / f"{NAME}.safetensors"


def test_captions_never_say_where_the_building_stands():
    rng = random.Random(0)
    for _ in range(200):
        text = caption(scenes.random_scene(rng), rng)
        assert not any(c in text for c in POSITION_CLAUSES), text
        assert "building" in text or "house" in text or "office" in text or "tower" in text \
            or "headquarters" in text


def test_control_maps_are_binary_edges_at_64_px():
    image = scenes.draw(scenes.Scene(position="right"), 64).image
    for res in (64, 128, 512):
        m = control_map(image, res, 100, 200)
        assert m.shape == (64, 64, 3) and set(np.unique(m)) <= {0, 255}
        cols = np.nonzero(m[:, :, 0])[1]
        assert cols.mean() > 34  # the building's edges are on the right


def test_a_few_steps_write_a_control_tiny_canny_that_loads(tmp_path):
    """The standalone command: only the ControlNet, against the shipped tiny."""
    assert main(["--out", str(tmp_path), "--steps", "2", "--pool", "8", "--hires-pool", "2",
                 "--threads", "1", "--set", "controlnet_batch=4", "hires_every=2"]) == 0
    path = tmp_path / "ControlNet" / f"{NAME}.safetensors"  # step 2 was at 128 px
    assert path.stat().st_size < 5 * 2**20
    saved = json.loads((tmp_path / "ControlNet" / f"{NAME}.json").read_text())
    assert "--pool 8 --hires-pool 2 --steps 2 --set controlnet_batch=4 hires_every=2" in \
        saved["command"]
    assert saved["steps"] == saved["steps_done"] == 2 and len(saved["loss_curve"]) == 1
    assert saved["settings"]["controlnet_batch"] == 4
    assert saved["tiny_unet_sha256"] == json.loads(SHIPPED.with_suffix(".json").read_text())[
        "tiny_unet_sha256"]
    config = json.loads((tiny.model_folder() / "unet" / "config.json").read_text())
    assert controlnet.misfit(path, config, "tiny") is None
    model = controlnet.load(path, config, torch.float32)
    assert model.config.conditioning_embedding_out_channels == (16, 32, 64, 128)


def test_the_standalone_command_refuses_what_the_controlnet_does_not_read(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--steps", "2", "--set", "unet_batch=4"])
    assert "unet_batch: not a setting of the ControlNet" in capsys.readouterr().err
    assert not (tmp_path / "ControlNet").exists()


def red_centre(picture: np.ndarray) -> tuple[float, int]:
    """The mean column of the red building's pixels, and how many there are."""
    p = picture.astype(np.int16)
    red = (p[:, :, 0] - np.maximum(p[:, :, 1], p[:, :, 2])) > 50
    cols = np.nonzero(red)[1]
    return (float(cols.mean()) if cols.size else 32.0), int(cols.size)


@pytest.mark.skipif(not SHIPPED.exists(), reason="control_tiny_canny is not trained yet: "
                    "python -m sdbatch.tiny_train.controlnet --out sdbatch/models/tiny_family")
def test_edges_put_the_building_where_they_are(tmp_path):
    seeds = [1, 2, 3, 4, 5, 6]
    for position in ("left", "right"):
        drawing = tmp_path / f"{position}.png"
        Image.fromarray(scenes.draw(scenes.Scene(colour="red", position=position, storeys=3,
                                                 seed=7), 64).image).save(drawing)
        raw = {"prompt": "a red building, three storeys, lawn, blue sky",
               "negative_prompt": "",
               "params": {"sampler": "Euler a", "steps": 20, "cfg_scale": 5, "seed": seeds,
                          "width": 64, "height": 64},
               "controlnet": [{"model": NAME, "image": str(drawing), "preprocessor": "canny",
                               "pixel_perfect": True}],
               "run": {"dir": str(tmp_path / position), "progress": "quiet"}}
        assert runner.run(validate(raw), lambda key: "test", [], ["test"]) == 0
        entries = [json.loads(x) for x in
                   (tmp_path / position / "manifest.jsonl").read_text().splitlines()]
        for seed, entry in zip(seeds, entries, strict=True):
            picture = np.asarray(Image.open(tmp_path / position / entry["file"]).convert("RGB"))
            centre, count = red_centre(picture)
            assert count >= 40, f"seed {seed}: no red building ({count} red pixels)"
            assert (centre < 28) if position == "left" else (centre > 36), \
                f"seed {seed}, edges on the {position}: the red mass is centred at x={centre:.1f}"


def test_shipped_file_if_present_fits_tiny():
    if not SHIPPED.exists():
        pytest.skip("control_tiny_canny is not trained yet")
    config = json.loads((tiny.model_folder() / "unet" / "config.json").read_text())
    assert controlnet.misfit(SHIPPED, config, "tiny") is None
    assert SHIPPED.stat().st_size < 5 * 2**20
    assert Path(SHIPPED.with_suffix(".json")).is_file()
