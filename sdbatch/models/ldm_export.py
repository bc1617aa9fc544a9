"""diffusers models -> one checkpoint file in the original LDM key layout (what the WebUI loads).

This is the inverse of diffusers' single-file conversion, so any pipeline sdbatch can load
(the embedded tiny model included) can be handed to the WebUI, ComfyUI or back to
`load_single_file`, and the single-file path can be tested with no download. Layouts:
UNet `model.diffusion_model.*`, VAE `first_stage_model.*`; SD1 text encoder
`cond_stage_model.transformer.text_model.*`; SD2 `cond_stage_model.model.*` (OpenCLIP);
SDXL `conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*`
(OpenCLIP-bigG).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
          ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename(sd: Mapping[str, torch.Tensor], old: str, new: str, out: dict,
            inner: tuple[tuple[str, str], ...] = ()) -> None:
    """Copy every key under prefix old to prefix new, renaming inner parts."""
    for key, value in sd.items():
        if key.startswith(old + "."):
            rest = key[len(old) + 1:]
            for a, b in inner:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            out[f"{new}.{rest}"] = value


def unet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers UNet2DConditionModel state dict -> LDM `openaimodel` keys (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        if head in UNET_TOP:
            out[f"{UNET_TOP[head]}.{leaf}"] = value
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    for i in range(levels):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            _rename(sd, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", out, RESNET)
            _rename(sd, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", out)
        down = 1 + i * (per + 1) + per  # the block after the level's resnets
        _rename(sd, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{down}.0.op", out)
    _rename(sd, "mid_block.resnets.0", "middle_block.0", out, RESNET)
    _rename(sd, "mid_block.attentions.0", "middle_block.1", out)
    _rename(sd, "mid_block.resnets.1", "middle_block.2", out, RESNET)
    for i in range(levels):
        for j in range(per + 1):
            k = i * (per + 1) + j
            _rename(sd, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", out, RESNET)
            _rename(sd, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", out)
        last = i * (per + 1) + per
        slot = 2 if f"up_blocks.{i}.attentions.{per}.proj_in.weight" in sd else 1
        _rename(sd, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{slot}.conv", out)
    missing = len(sd) - len(out)
    if missing:
        raise ValueError(f"{missing} UNet weights have no LDM name; is this a UNet2DCondition "
                         "model with the config given?")
    return out


VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers AutoencoderKL state dict -> LDM autoencoder keys (no prefix).

    The mid-block attention is 1x1 convolutions in LDM and linear layers in diffusers.
    """
    out: dict[str, torch.Tensor] = {}
    for part in ("encoder", "decoder"):
        for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"),
                     ("conv_norm_out", "norm_out")):
            _rename(sd, f"{part}.{a}", f"{part}.{b}", out)
        for r in (0, 1):
            _rename(sd, f"{part}.mid_block.resnets.{r}", f"{part}.mid.block_{r + 1}", out,
                    VAE_RESNET)
        for key, value in sd.items():
            prefix = f"{part}.mid_block.attentions.0."
            if key.startswith(prefix):
                name, _, leaf = key[len(prefix):].rpartition(".")
                if name != "group_norm" and value.ndim == 2:
                    value = value[:, :, None, None]
                out[f"{part}.mid.attn_1.{VAE_ATTN[name]}.{leaf}"] = value
    _rename(sd, "quant_conv", "quant_conv", out)
    _rename(sd, "post_quant_conv", "post_quant_conv", out)
    levels = len(config["block_out_channels"])
    for i in range(levels):
        _rename(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv",
                f"encoder.down.{i}.downsample.conv", out)
        for j in range(config["layers_per_block"]):
            _rename(sd, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                    out, VAE_RESNET)
        up = levels - 1 - i  # the decoder counts its levels from the bottom
        _rename(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv",
                out)
        for j in range(config["layers_per_block"] + 1):
            _rename(sd, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", out,
                    VAE_RESNET)
    missing = len(sd) - len(out)
    if missing:
        raise ValueError(f"{missing} VAE weights have no LDM name; is this an AutoencoderKL?")
    return out


def _text_model_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """transformers >= 5.6 flattens CLIPTextModel; LDM files keep the text_model level."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict:
    """An OpenAI-CLIP text encoder (SD1, SDXL's first): HF keys under text_model.*."""
    return {k: v for k, v in _text_model_keys(sd).items() if k.startswith("text_model.")}


OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                   ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict:
    """An OpenCLIP text encoder (SD2, SDXL's second) in HF layout -> OpenCLIP keys.

    q, k and v go back into one in_proj; the projection is stored transposed, as OpenCLIP
    keeps it (hidden x projection).
    """
    sd = _text_model_keys(sd)
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    n = 0
    while f"text_model.encoder.layers.{n}.layer_norm1.weight" in sd:
        src, dst = f"text_model.encoder.layers.{n}", f"transformer.resblocks.{n}"
        for leaf in ("weight", "bias"):
            out[f"{dst}.attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{src}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for a, b in OPEN_CLIP_LAYER:
                out[f"{dst}.{b}.{leaf}"] = sd[f"{src}.{a}.{leaf}"]
        n += 1
    return out


def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor]) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def own_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict seen through peft's LoRA wrappers: each wrapped layer's own
    (base) weights under its own name, the adapters left out. A stack keeps LoRAs loaded
    between batches, unfused while none applies, so this is the model without them."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".lora_" not in k}


def pipeline_to_ldm(pipe) -> dict:
    """A whole SD1/SD2/SDXL pipeline -> one LDM-layout state dict.

    SDXL is told by its second text encoder, SD2 by its 1024-wide cross-attention, as the
    loader tells them.
    """
    unet, vae = pipe.unet, pipe.vae
    sd = _prefixed("model.diffusion_model.", unet_to_ldm(own_weights(unet), unet.config))
    sd |= _prefixed("first_stage_model.", vae_to_ldm(vae.state_dict(), vae.config))
    text = own_weights(pipe.text_encoder)
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd |= _prefixed("conditioner.embedders.0.transformer.", clip_to_ldm(text))
        sd |= _prefixed("conditioner.embedders.1.model.",
                        open_clip_to_ldm(own_weights(pipe.text_encoder_2)))
    elif unet.config.cross_attention_dim == 1024:
        sd |= _prefixed("cond_stage_model.model.", open_clip_to_ldm(text))
    else:
        sd |= _prefixed("cond_stage_model.transformer.", clip_to_ldm(text))
    return sd


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a pipeline as one checkpoint: .safetensors, or .ckpt/.pt as {"state_dict": ...}.

    dtype (e.g. torch.float16) halves the file as the WebUI's pruned checkpoints do.
    """
    return _write(pipeline_to_ldm(pipe), Path(path), dtype, wrap=True)


def _write(sd: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None,
           wrap: bool) -> Path:
    """Cast floating tensors to ``dtype`` and write .safetensors, or a pickle (a checkpoint's
    under {"state_dict": ...} when ``wrap``, as the WebUI's .ckpt files hold it)."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd} if wrap else sd, path)
    return path


def controlnet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers ControlNetModel state dict -> the original ControlNet keys (no prefix), as
    the released control_*.pth / .safetensors files hold them: the UNet encoder's names, the
    hint encoder ``input_hint_block.N`` (convolutions at even N), ``zero_convs.N.0`` and
    ``middle_block_out.0``; SDXL's added embedding as ``label_emb``."""
    own: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    hint = {"conv_in": "0", "conv_out": str(2 * (len(config.get(
        "conditioning_embedding_out_channels", (16, 32, 96, 256))) * 2 - 1))}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        parts = head.split(".")
        if parts[0] == "controlnet_cond_embedding":
            n = hint.get(parts[1]) if parts[1] != "blocks" else str(2 * (int(parts[2]) + 1))
            own[f"input_hint_block.{n}.{leaf}"] = value
        elif parts[0] == "controlnet_down_blocks":
            own[f"zero_convs.{parts[1]}.0.{leaf}"] = value
        elif parts[0] == "controlnet_mid_block":
            own[f"middle_block_out.0.{leaf}"] = value
        else:
            rest[key] = value
    return own | unet_to_ldm(rest, config)


def save_controlnet(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A ControlNetModel as one file in the original layout (what sd-webui-controlnet loads)."""
    return _write(controlnet_to_ldm(model.state_dict(), model.config), Path(path), dtype,
                  wrap=False)
