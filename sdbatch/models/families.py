"""Model families: which architecture a single-file checkpoint is, and its diffusers configs.

A single .safetensors/.ckpt holds weights only. diffusers needs a config folder to build the
models around them and would download one from the hub; sdbatch ships one per family inside
the package (written from the real SD1.5 / SD2.1 / SDXL-base configs), so loading never
touches the network. The family is told from the checkpoint's keys, as the WebUI and
diffusers do; `sd2-v` (v-prediction, 768) has the same keys as `sd2` and must be named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).parent / "configs"
PAD_SD1 = "<|endoftext|>"  # OpenAI CLIP pads with its end token
PAD_OPENCLIP = "!"  # OpenCLIP (SD2, SDXL's second encoder) pads with id 0, "!"


@dataclass(frozen=True)
class Family:
    name: str
    base: str  # sd15, sd2 or sdxl: the architecture without variant
    inpaint: bool
    vae_scaling: float
    pads: tuple[tuple[str, str], ...]  # (tokenizer component, its pad token)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "sd15", False, 0.18215, (("tokenizer", PAD_SD1),)),
    Family("sd15-inpaint", "sd15", True, 0.18215, (("tokenizer", PAD_SD1),)),
    Family("sd2", "sd2", False, 0.18215, (("tokenizer", PAD_OPENCLIP),)),
    Family("sd2-v", "sd2", False, 0.18215, (("tokenizer", PAD_OPENCLIP),)),
    Family("sd2-inpaint", "sd2", True, 0.18215, (("tokenizer", PAD_OPENCLIP),)),
    Family("sdxl", "sdxl", False, 0.13025,
           (("tokenizer", PAD_SD1), ("tokenizer_2", PAD_OPENCLIP))),
    Family("sdxl-inpaint", "sdxl", True, 0.13025,
           (("tokenizer", PAD_SD1), ("tokenizer_2", PAD_OPENCLIP))),
)}

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
SDXL_SECOND_ENCODER = "conditioner.embedders.1."


def family(name: str) -> Family:
    """The family called name, or a ValueError that lists the valid names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)} "
                         "(or 'auto' to tell it from the checkpoint)") from None


def config_folder(name: str) -> Path:
    """The shipped diffusers config folder of a family (configs only, no weights)."""
    return CONFIGS / family(name).name


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_family(source: str | os.PathLike | Mapping[str, Any],
                  allow_pickle: bool = False) -> str:
    """A checkpoint's family from its keys and shapes alone (no weights are read).

    source is a checkpoint path or a mapping key -> tensor or shape. The rules are those of
    the WebUI / diffusers: a 9-channel input conv is an inpainting model; a second text
    encoder (conditioner.embedders.1) is SDXL; cross-attention keys 1024 wide are SD2;
    anything else with an LDM UNet is SD1.x.
    """
    if isinstance(source, Mapping):
        shapes = {k: _shape(v) for k, v in source.items()}
        where = "the state dict"
    else:
        from sdbatch.models.single_file import read_shapes

        shapes = read_shapes(source, allow_pickle)
        where = str(source)
    if CONV_IN not in shapes:
        from sdbatch.models.single_file import ModelFileError

        raise ModelFileError(
            f"{where} is not a full Stable Diffusion checkpoint: it has no {UNET}* keys "
            "(a VAE, LoRA or embedding file goes elsewhere in the job; a diffusers-format "
            "file belongs in a diffusers folder)")
    if any(k.startswith(SDXL_SECOND_ENCODER) for k in shapes):
        base = "sdxl"
    elif any(k.startswith(UNET) and k.endswith("attn2.to_k.weight") and s[-1] == 1024
             for k, s in shapes.items()):
        base = "sd2"
    else:
        base = "sd15"
    inpaint = len(shapes[CONV_IN]) == 4 and shapes[CONV_IN][1] == 9
    return f"{base}-inpaint" if inpaint else base


def check_compatible(named: str, detected: str, where: str) -> None:
    """Refuse a named family that cannot hold these weights (sd2 and sd2-v share keys)."""
    a, b = family(named), family(detected)
    if (a.base, a.inpaint) != (b.base, b.inpaint):
        from sdbatch.models.single_file import ModelFileError

        raise ModelFileError(f"{where} looks like a {detected} checkpoint but the job says "
                             f"family {named}; set model.family to {detected} or 'auto'")


def tokenizer_folder(name: str, component: str = "tokenizer") -> Path:
    """A CLIP tokenizer folder for a family's tokenizer component, made offline, cached."""
    pads = dict(family(name).pads)
    if component not in pads:
        raise ValueError(f"family {name} has no {component}; it has {', '.join(pads)}")
    return _ensure_tokenizer(pads[component])


def _ensure_tokenizer(pad_token: str) -> Path:
    """The single seam for tokenizer files: the real CLIP BPE vocabulary, rebuilt offline
    from the file shipped in sdbatch.prompts and cached per pad token."""
    from sdbatch.models.clip_vocab import ensure_clip_tokenizer

    return ensure_clip_tokenizer(pad_token)
