"""`sdbatch reproduce IMAGE.png`: render an image again from the recipe in its PNG and say
whether the bytes match.

The PNG carries the seed-resolved job (with executor.max_batch) and the image's index, so
the very batch the image was rendered in is rendered again: batch composition changes
kernel numerics by a level or so, and reproducing means the same forward pass. It runs with
the recorded dtype and torch thread count; on another device (or GPU model, or CPU
architecture) kernels round differently, so bytes cannot match: it says so and compares
pixels within TOLERANCE.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sdbatch import __version__, atomic, matrix, schema
from sdbatch.models import stack as stacks
from sdbatch.output import png, records
from sdbatch.run import render_one

# across devices: mean absolute difference, in levels of 255, that still counts as the image
TOLERANCE = 2.0


def reproduce(image: Path, out: Path | None = None) -> bool:
    import torch

    original = image.read_bytes()  # before ``out`` (which may be the image) is written
    data = png.read_recipe(image)
    label = f"the recipe in {image}"
    made = data["recipe"].get("device")  # absent in PNGs of older versions
    raw = json.loads(json.dumps(data["job"]))  # the PNG's own stays as it is, for the bytes
    if made:
        raw["model"]["dtype"] = data["recipe"]["model"]["dtype"]
        torch.set_num_threads(made["threads"])
    tiles = [stage["params"][f"{key}_model"]["tile"] for stage in data["recipe"].get("stages", [])
             for key in ("upscaler", "upscaler_2") if f"{key}_model" in stage["params"]]
    # the passes of the run: PNGs of versions before executor.max_batch made passes of
    # params.batch_size; and what of the executor's settings made the pixels
    raw["executor"] = {"max_batch": raw.get("executor", {}).get(
        "max_batch", raw["params"]["batch_size"])}
    raw["executor"] |= {name: True for name in data["recipe"]["model"].get("switches", ())}
    if tiles:  # the upscaler tiles of the run (an executor setting, not in the job)
        raw["executor"] |= {"upscaler_tile_px": tiles[0][0],
                            "upscaler_tile_overlap": tiles[0][1]}
    vae_tiles = [stage["params"]["vae_tile_px"] for stage in data["recipe"].get("stages", [])
                 if "vae_tile_px" in stage["params"]]
    if vae_tiles:  # the VAE's tiles of the run, likewise
        raw["executor"]["vae_tile_px"] = vae_tiles[0]
    job = schema.validate(raw, lambda key: label)
    here = stacks.machine(stacks.pick_device(job.executor.device))
    moved = made is not None and (made["device"], made["device_name"]) != \
        (here["device"], here["device_name"])
    if moved:
        print(f"note: {image} was made on {made['device']} ({made['device_name']}), this is "
              f"{here['device']} ({here['device_name']}): kernels round differently, so the "
              f"bytes cannot match; comparing pixels (mean difference at most {TOLERANCE} "
              "levels of 255)")
    index = data["index"]
    recorded = data["recipe"]["params"]
    # the prompts as rendered: a random dynamic prompt is not picked again (its wildcard
    # files need not exist any more)
    if raw["dynamic_prompts"]["mode"] == "random":
        raw["dynamic_prompts"]["mode"] = "off"
    raw["run"] = {"max_images": matrix.count(job)}  # as many as its run made, whatever the default
    job = schema.validate(raw, lambda key: label)
    p, render, picture = render_one(job, lambda key: label, index,
                                    {index: (recorded["prompt"], recorded["negative_prompt"])},
                                    records.oom_retries(data["recipe"]))
    spec = p.specs[render.checkpoint]
    if spec.model_hash != data["recipe"]["model"]["hash"]:
        print(f"note: model {spec.name} now hashes to {spec.model_hash}, the image was made "
              f"with {data['recipe']['model']['hash']}: expect different pixels")
    chain = p.plan.chains[index]
    for was, now in zip(data["recipe"].get("stages", []), chain, strict=False):
        for field, name in (("sha256", "path"), ("mask_sha256", "mask")):
            if field in was.get("params", {}) and was["params"][field] != now.params.get(field):
                print(f"note: {now.params[name]} changed since the image was made (sha256 "
                      f"{was['params'][field][:12]}... then, {now.params[field][:12]}... now): "
                      "expect different pixels")
    fresh = png.encode(picture.image, records.infotext(render, p.specs, chain),
                       records.png_recipe(render, spec, chain, data["job"],
                                          picture.chain_found))
    if out is not None:
        atomic.write_bytes(out, fresh)
    if fresh == original:
        print(f"reproduced: {image} matches byte for byte")
        return True
    with Image.open(io.BytesIO(original)) as was:
        old = np.asarray(was.convert("RGB"), dtype=np.int16)
        written_by = was.text.get("parameters", "").rpartition("Version: ")[2].split(",")[0]
    new = np.asarray(picture.image.convert("RGB"), dtype=np.int16)
    if old.shape != new.shape:
        print(f"differs: {image} does not match (sizes differ: {old.shape} and {new.shape})")
        return False
    diff = np.abs(old - new)
    largest, mean = int(diff.max()), float(diff.mean())
    if largest == 0:  # the text beside them differs: another sdbatch version wrote it
        print(f"reproduced: {image}'s pixels match exactly; its metadata differs (written "
              f"by {written_by or 'another version'}, this is sdbatch {__version__})")
        return True
    if moved and mean <= TOLERANCE:
        print(f"reproduced within tolerance on another device: {image} (mean pixel difference "
              f"{mean:.2f}, largest {largest})")
        return True
    print(f"differs: {image} does not match byte for byte (largest pixel difference: "
          f"{largest}, mean {mean:.2f})")
    return False
