"""ControlNet models, offline: a single file in the layout sd-webui-controlnet loads (the
original LDM keys, with or without ``control_model.``; or diffusers' keys) or a diffusers
folder, for SD1.x, SD2.x, SDXL and the tiny family.

A ControlNet copies its UNet's encoder, so a single file is built from the config of the
stack's own UNet (as the extension builds one from the SD model it runs with) and its
weights go through diffusers' LDM converter: nothing is fetched. Whether a file fits a
stack is told from shapes alone (the cross-attention width and the channels of every
residual it hands the UNet), before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.models.single_file import ModelFileError, read_shapes, read_state_dict

LDM_PREFIX = "control_model."
# the parts of a ControlNet in the original layout (the extension's cldm)
LDM_PARTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "zero_convs.",
             "middle_block_out.", "input_hint_block.")
CONDITIONING_CHANNELS = (16, 32, 96, 256)  # every released ControlNet's hint encoder
SHARED = ("flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
          "block_out_channels", "layers_per_block", "downsample_padding",
          "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
          "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
          "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
          "use_linear_projection", "class_embed_type", "addition_embed_type",
          "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
          "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type")
FAMILY_WORDS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class Signature:
    """What must match between a ControlNet and a UNet: the text width it attends to and
    the channels of each residual (down blocks, then the mid block)."""

    cross_attention_dim: int
    residuals: tuple[int, ...]

    def words(self) -> str:
        family = FAMILY_WORDS.get(self.cross_attention_dim)
        shape = (f"cross-attention {self.cross_attention_dim}, {len(self.residuals)} "
                 f"residuals of {'/'.join(map(str, sorted(set(self.residuals))))} channels")
        return f"{family} ({shape})" if family else shape


def _per_block(value: Any, blocks: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def config_signature(config: Mapping[str, Any]) -> Signature:
    """A UNet's (or diffusers ControlNet's) config -> the residuals a ControlNet gives it:
    conv_in, each resnet of each down block, each downsampler, then the mid block."""
    channels = list(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], len(channels))
    out = [channels[0]]
    for i, ch in enumerate(channels):
        out += [ch] * layers[i]
        if i < len(channels) - 1:
            out.append(ch)
    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    return Signature(int(cross), (*out, channels[-1]))


def shapes_signature(shapes: Mapping[str, tuple[int, ...]], where: str) -> Signature:
    """A ControlNet file's signature from its tensor shapes (LDM or diffusers keys)."""
    shapes = {k.removeprefix(LDM_PREFIX): tuple(v) for k, v in shapes.items()}
    if "zero_convs.0.0.weight" in shapes:
        down = [shapes[f"zero_convs.{i}.0.weight"][0] for i in range(len(shapes))
                if f"zero_convs.{i}.0.weight" in shapes]
        mid = shapes.get("middle_block_out.0.weight")
    elif "controlnet_down_blocks.0.weight" in shapes:
        down = [shapes[f"controlnet_down_blocks.{i}.weight"][0] for i in range(len(shapes))
                if f"controlnet_down_blocks.{i}.weight" in shapes]
        mid = shapes.get("controlnet_mid_block.weight")
    else:
        raise ModelFileError(f"{where} is not a ControlNet: it has neither zero_convs.* (the "
                             "original layout) nor controlnet_down_blocks.* (diffusers') "
                             "keys; T2I adapters, control LoRAs and IP-adapters are not "
                             "supported")
    cross = next((s[-1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), 0)
    return Signature(int(cross), (*down, mid[0] if mid else 0))


def signature(path: str | os.PathLike) -> Signature:
    """A ControlNet's signature: a diffusers folder from its config, a file from shapes."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelFileError(f"{path} is not a diffusers ControlNet folder (no config.json)")
        return config_signature(json.loads(config.read_text(encoding="utf-8")))
    return shapes_signature(read_shapes(path), str(path))


def misfit(path: str | os.PathLike, unet_config: Mapping[str, Any], stack: str) -> str | None:
    """Why the ControlNet at ``path`` cannot steer the stack's UNet, or None."""
    mine, theirs = signature(path), config_signature(unet_config)
    if mine != theirs:
        return (f"{Path(path).name} is a ControlNet for {mine.words()}, but the stack {stack} "
                f"is {theirs.words()}: give a ControlNet made for the stack's family (SD1.x: "
                "control_v11*_sd15_*; SDXL: *xl*; the tiny family: control_tiny_canny)")
    if not Path(path).is_dir():  # its weights, as shapes only, into a model on no device:
        import torch  # a Union or a small/mid SDXL ControlNet has other layers than ours

        shapes = read_shapes(path)
        try:
            _build({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                   unet_config, torch.float32, Path(path))
        except ModelFileError as e:
            return (f"{e}; sdbatch builds ControlNets the shape of the stack's UNet encoder "
                    "(ControlNet-Union and the small/mid SDXL ones are other architectures)")
    return None


def config_from_unet(unet_config: Mapping[str, Any],
                     hint_channels: tuple[int, ...] = CONDITIONING_CHANNELS) -> dict[str, Any]:
    """A ControlNetModel config mirroring a UNet's encoder (diffusers' from_unet, without
    building the UNet); a 9-channel inpainting UNet's ControlNet takes the 4 latent channels
    (the extension hands it x[:, :4])."""
    config = {k: unet_config[k] for k in SHARED if k in unet_config}
    config["in_channels"] = unet_config.get("out_channels", unet_config["in_channels"])
    config["conditioning_embedding_out_channels"] = tuple(hint_channels)
    return config


def hint_channels(sd: Mapping[str, Any]) -> tuple[int, ...]:
    """The hint encoder's widths from diffusers-named weights: its first convolution, then
    every second block (each level is a convolution, then a strided one to the next)."""
    key = "controlnet_cond_embedding.blocks.{}.weight"
    blocks = sum(1 for i in range(len(sd)) if key.format(i) in sd)
    return (sd["controlnet_cond_embedding.conv_in.weight"].shape[0],
            *(sd[key.format(i)].shape[0] for i in range(1, blocks, 2)))


def own_tensors(sd: dict) -> dict:
    """The ControlNet's tensors without their ``control_model.`` prefix; of a ControlNet 1.0
    file, which holds all of SD beside them, only those."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k.removeprefix(LDM_PREFIX): v for k, v in sd.items()
                if k.startswith(LDM_PREFIX)}
    return sd


def _ldm_to_diffusers(sd: dict, config: dict[str, Any]) -> dict:
    """The original layout -> diffusers' keys, through diffusers' own converter; SDXL's
    ``label_emb`` (which that converter leaves out) mapped to ``add_embedding``."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    sd = own_tensors(sd)
    out = convert_controlnet_checkpoint(sd, config)
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        target = "add_embedding" if config.get("addition_embed_type") else "class_embedding"
        for ldm, new in (("label_emb.0.0", "linear_1"), ("label_emb.0.2", "linear_2")):
            for leaf in ("weight", "bias"):
                if f"{ldm}.{leaf}" in sd:
                    out[f"{target}.{new}.{leaf}"] = sd[f"{ldm}.{leaf}"]
    return {k: v for k, v in out.items() if v is not None}


def load(path: str | os.PathLike, unet_config: Mapping[str, Any], dtype,
         allow_pickle: bool = False):
    """A ControlNetModel in ``dtype`` from a file or diffusers folder, fully offline."""
    from diffusers import ControlNetModel

    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    path = Path(path)
    if path.is_dir():
        return ControlNetModel.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    model = _build(read_state_dict(path, allow_pickle), unet_config, dtype, path)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ModelFileError(f"{path} has no weights for {len(empty)} tensors (e.g. {empty[0]})")
    return model.eval()


def _build(sd: dict, unet_config: Mapping[str, Any], dtype, path: Path):
    """A ControlNetModel holding the file's tensors (converted from the original layout),
    every one of them in place, or ModelFileError."""
    import torch
    from diffusers import ControlNetModel

    config = config_from_unet(unet_config)
    try:
        if "time_embedding.linear_1.weight" not in sd:
            original = own_tensors(sd)
            sd = _ldm_to_diffusers(sd, config)
            if len(sd) < len(original):  # the converter drops what it has no place for
                odd = sorted(k for k in original if not k.startswith(LDM_PARTS))
                raise ModelFileError(
                    f"{path}: {len(original) - len(sd)} of its tensors have no place in a "
                    f"ControlNet of the stack's UNet (e.g. {(odd or sorted(original))[0]})")
        config = config_from_unet(unet_config, hint_channels(sd))
    except (KeyError, ValueError, IndexError) as e:
        raise ModelFileError(f"{path}: not a ControlNet sdbatch can read ({type(e).__name__}: "
                             f"{e})") from e
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True,
                              assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: its weights do not fit the stack's UNet "
                             f"({str(e).splitlines()[0]})") from e
    return model
