"""`sdbatch reproduce IMAGE.png`: render an image again from the recipe in its PNG and say
whether the bytes match.

The PNG carries the seed-resolved job and the image's index, so the very batch the image was
rendered in is rendered again: batch composition changes kernel numerics by a level or so,
and reproducing means the same forward pass.
"""

from __future__ import annotations

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


def reproduce(image: Path, out: Path | None = None) -> bool:
    data = png.read_recipe(image)
    label = f"the recipe in {image}"
    job = schema.validate(data["job"], lambda key: label)
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
    else:
        old = np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)
        new = np.asarray(result.images[position].convert("RGB"), dtype=np.int16)
        diff = int(np.abs(old - new).max()) if old.shape == new.shape else None
        print(f"differs: {image} does not match byte for byte "
              f"(largest pixel difference: {diff if diff is not None else 'sizes differ'})")
    return same
