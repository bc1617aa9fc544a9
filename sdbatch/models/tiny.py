"""The embedded `tiny` family: a small SD1.x-architecture model that sdbatch trained itself.

Same parts as real SD1.x (a UNet with cross-attention, a VAE that downscales by 8 into 4
latent channels, a CLIP text encoder and tokenizer), only narrow, trained with
`python -m sdbatch.tiny_train` on toy brick buildings drawn by sdbatch (64x64 images). It
ships inside the package as an A1111-style models folder (tiny/ a diffusers folder, Lora/
LegoAlrev, embeddings/nightsky, train_settings.json with the settings that made it) and loads
through the very code that loads a user's diffusers folder and networks: no download ever.
"""

from __future__ import annotations

import os
from pathlib import Path

FAMILY = Path(__file__).parent / "tiny_family"  # shipped: tiny/, Lora/, embeddings/

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
    """Where sdbatch keeps derived tokenizers and its hash cache (SDBATCH_CACHE overrides)."""
    if env := os.environ.get("SDBATCH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdbatch"


def model_folder() -> Path:
    """The tiny model's diffusers folder (shipped with the package)."""
    return FAMILY / "tiny"


def family_models() -> Path:
    """The embedded family as an A1111 models folder, so jobs on `tiny` name its LoRA
    (<lora:LegoAlrev:0.8>, trained to turn buildings into LEGO bricks) and its embedding
    (nightsky, a night sky) with no download."""
    return FAMILY
