"""The embedded `tiny` model: a small SD1.x-architecture pipeline that sdbatch builds itself.

Same parts as real SD1.x (a UNet with cross-attention, a VAE that downscales by 8 into 4
latent channels, a CLIP text encoder, a CLIP tokenizer), only narrow. It is built
deterministically from a fixed seed, saved once to the cache as a diffusers folder and then
loaded through the very code that loads a user's diffusers folder, so every test of the
loading path runs with no download. Attention sits at the half-resolution level only, which
keeps a 512x512 render at a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sdbatch.models.tokenizer import byte_level_vocab, write_byte_level_tokenizer
from sdbatch.output import atomic

VERSION = "1"  # bump when the architecture or build recipe changes

SCHEDULER = {  # SD1.5's own scheduler config
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


MODEL_INDEX = {  # a diffusers StableDiffusionPipeline folder without safety checker
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def cache_root() -> Path:
    """Where sdbatch keeps built models and its hash cache (SDBATCH_CACHE overrides)."""
    if env := os.environ.get("SDBATCH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdbatch"


def build(folder: Path) -> None:
    """Build the tiny pipeline from seed 0 and save it as a diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=512,
        scaling_factor=0.18215,
    )
    vocab = byte_level_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu",
    ))
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    write_byte_level_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


def ensure() -> Path:
    """The tiny model's folder, built on first use; concurrent builders never see half a folder."""
    return atomic.build_folder(cache_root() / "models" / f"tiny-v{VERSION}", "model_index.json",
                               build)


TINY_LORA = "LegoAlrev"  # the seed's LoRA: turns the building into LEGO bricks
TINY_EMBEDDING = "nightsky"


def family_models() -> Path:
    """The embedded family as an A1111 models folder (Lora/, embeddings/), so jobs on `tiny`
    use <lora:LegoAlrev:0.8> and embeddings by name with no download. Written once; the
    same bytes every time."""
    from sdbatch.models.embeddings import write_a1111_embedding
    from sdbatch.models.lora import write_kohya_lora

    folder = cache_root() / "models" / f"tiny-v{VERSION}-family"
    lora = folder / "Lora" / f"{TINY_LORA}.safetensors"
    embedding = folder / "embeddings" / f"{TINY_EMBEDDING}.pt"
    if lora.exists() and embedding.exists():
        return folder
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    model = ensure()
    for part in (lora.parent, embedding.parent):
        part.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder", local_files_only=True)
    tmp = lora.with_name(f".{lora.name}.{os.getpid()}.tmp")
    write_kohya_lora(tmp, unet, text_encoder, rank=4, seed=1, scale=1.0, name=TINY_LORA)
    os.replace(tmp, lora)
    torch.manual_seed(2)
    vectors = torch.randn(2, text_encoder.config.hidden_size) * 0.5
    tmp = embedding.with_name(f".{embedding.name}.{os.getpid()}.tmp")
    write_a1111_embedding(tmp, vectors, name=TINY_EMBEDDING)
    os.replace(tmp, embedding)
    return folder
