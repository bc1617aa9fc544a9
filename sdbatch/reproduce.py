"""`sdbatch reproduce IMAGE.png`: render an image again from the recipe in its PNG and say
whether the bytes match.

The PNG carries the seed-resolved job and the image's index, so the very batch the image was
rendered in is rendered again: batch composition changes kernel numerics by a level or so,
and reproducing means the same forward pass. It runs with the recorded dtype and torch
thread count; on another device (or GPU model, or CPU architecture) kernels round
differently, so bytes cannot match: it says so and compares pixels within TOLERANCE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sdbatch import matrix, schema
from sdbatch.executors.local import execute
from sdbatch.models import stack as stacks
from sdbatch.output import atomic, png, records
from sdbatch.output.run_folder import sha256_file
from sdbatch.plan import make_plan
from sdbatch.schema import JobError

# across devices: mean absolute difference, in levels of 255, that still counts as the image
TOLERANCE = 2.0


def reproduce(image: Path, out: Path | None = None) -> bool:
    import torch

    data = png.read_recipe(image)
    label = f"the recipe in {image}"
    made = data["recipe"].get("device")  # absent in PNGs of older versions
    raw = json.loads(json.dumps(data["job"]))  # the PNG's own stays as it is, for the bytes
    if made:
        raw["model"]["dtype"] = data["recipe"]["model"]["dtype"]
        torch.set_num_threads(made["threads"])
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
    recorded_params = data["recipe"]["params"]
    # the prompts as rendered: a random dynamic prompt is not picked again (its wildcard
    # files need not exist any more)
    renders = matrix.expand(job, {index: (recorded_params["prompt"],
                                          recorded_params["negative_prompt"])})
    checkpoint = renders[index].checkpoint
    spec, problems = stacks.resolve(job.model, job.paths, checkpoint, lambda key: label)
    if problems:
        raise JobError(problems)
    recorded = data["recipe"]["model"]["hash"]
    if spec.model_hash != recorded:
        print(f"note: model {spec.name} now hashes to {spec.model_hash}, the image was made "
              f"with {recorded}: expect different pixels")
    mine = [r for r in renders if r.checkpoint == checkpoint]
    networks, problems = stacks.resolve_networks(job, mine, lambda key: label)
    if problems:
        raise JobError(problems)
    spec = stacks.with_embeddings({checkpoint: spec}, mine, job)[checkpoint]
    specs = {checkpoint: spec}
    plan = make_plan(mine, {checkpoint: spec.identity}, job.params.batch_size,
                     {k: f.hash for k, f in networks.items()})
    batch = next(b for b in plan.batches if any(r.index == index for r in b.renders))
    cache = stacks.StackCache(stacks.pick_device(job.executor.device))
    result = next(execute([batch], specs, cache, networks))
    if result.error:
        raise ValueError(f"the render failed: {result.error}")
    position = [r.index for r in batch.renders].index(index)
    render = batch.renders[position]
    fresh = png.encode(result.images[position], records.infotext(render, spec, plan.chains[index]),
                       records.png_recipe(render, spec, plan.chains[index], data["job"]))
    if out is not None:
        atomic.write_bytes(out, fresh)
    import hashlib

    same = hashlib.sha256(fresh).hexdigest() == sha256_file(image)
    if same:
        print(f"reproduced: {image} matches byte for byte")
        return True
    old = np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)
    new = np.asarray(result.images[position].convert("RGB"), dtype=np.int16)
    if old.shape != new.shape:
        print(f"differs: {image} does not match (sizes differ: {old.shape} and {new.shape})")
        return False
    diff = np.abs(old - new)
    largest, mean = int(diff.max()), float(diff.mean())
    if moved and mean <= TOLERANCE:
        print(f"reproduced within tolerance on another device: {image} (mean pixel difference "
              f"{mean:.2f}, largest {largest})")
        return True
    print(f"differs: {image} does not match byte for byte (largest pixel difference: "
          f"{largest}, mean {mean:.2f})")
    return False
