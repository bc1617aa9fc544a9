"""Renders -> keyed stage calls -> batches of forward passes.

Each image is a chain of stage calls. A call's content key hashes its kind, its parameters,
its input's key and the model stack's identity, so equal work has an equal key (a resumed
run recognises what is done, later stages share prefixes). Calls that differ only in seed
or prompt are grouped into forward passes of batch_size images; the grouping depends on the
job alone, never on how many workers run it, so bytes reproduce.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sdbatch.matrix import Render

# what may differ inside one forward pass: it changes the noise or the text, not the pass
PER_IMAGE = ("seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
             "ensd", "prompt", "negative_prompt")


def content_key(kind: str, params: dict[str, Any], input_key: str | None, stack: str) -> str:
    blob = json.dumps([kind, params, input_key, stack], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StageCall:
    kind: str
    params: dict[str, Any]
    input_key: str | None
    stack: str

    @property
    def key(self) -> str:
        return content_key(self.kind, self.params, self.input_key, self.stack)

    def group(self) -> str:
        """Calls with the same group can share a forward pass."""
        shared = {k: v for k, v in self.params.items() if k not in PER_IMAGE}
        return content_key(self.kind, shared, None, self.stack)


@dataclass(frozen=True)
class Batch:
    kind: str
    renders: tuple[Render, ...]


@dataclass(frozen=True)
class Plan:
    chains: dict[int, tuple[StageCall, ...]]
    batches: tuple[Batch, ...]

    def key(self, index: int) -> str:
        """The content key of an image: the key of its last stage call."""
        return self.chains[index][-1].key


def chain(render: Render, stack: str, networks: dict[tuple[str, str], str]
          ) -> tuple[StageCall, ...]:
    params = render.params()
    for kind, field in (("lora", "loras"), ("hypernet", "hypernetworks")):
        params[field] = [[name, weight, networks.get((kind, name), "")]
                         for name, weight in params[field]]
    return (StageCall("txt2img", params, None, stack),)


def make_plan(renders: list[Render], stacks: dict[str, str], batch_size: int,
              networks: dict[tuple[str, str], str] | None = None) -> Plan:
    """``stacks`` maps each checkpoint name of the job to its stack identity, ``networks``
    each (kind, name) of a LoRA or hypernetwork to its file hash: keys follow the files."""
    chains = {r.index: chain(r, stacks[r.checkpoint], networks or {}) for r in renders}
    groups: dict[str, list[Render]] = {}
    for r in renders:
        groups.setdefault(chains[r.index][0].group(), []).append(r)
    batches = []
    for members in groups.values():
        for i in range(0, len(members), batch_size):
            batches.append(Batch("txt2img", tuple(members[i:i + batch_size])))
    batches.sort(key=lambda b: b.renders[0].index)
    return Plan(chains, tuple(batches))
