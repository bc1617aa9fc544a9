"""Tests run offline on the embedded tiny model, built once per session into a temp cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdbatch.models import families
from sdbatch.models.tokenizer import byte_level_vocab, write_byte_level_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def sdbatch_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("sdbatch-cache")
    os.environ["SDBATCH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """Tiny renders take 0.1 s on one thread but up to 10 s on two when other processes
    share the two cores (threads spin-wait on each other); a module that renders many
    asks for it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_spec(sdbatch_cache):
    from sdbatch.models.stack import StackSpec
    from sdbatch.models.tiny import model_folder

    return StackSpec("tiny", model_folder(), "auto")


@pytest.fixture(scope="session")
def tiny_stack(tiny_spec):
    import torch

    from sdbatch.models.stack import load

    return load(tiny_spec, torch.device("cpu"))


def write_job(folder: Path, name: str, text: str) -> Path:
    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    path = folder / "jobs" / f"{name}.yaml"
    path.write_text(text)
    return path


def sdbatch(cwd: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's sdbatch, not another
    proc = subprocess.run([sys.executable, "-m", "sdbatch", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"sdbatch {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


SMALL_JOB = """# @package _global_
job:
  name: small
prompt: ["a red house", "a blue tower"]
negative_prompt: "blurry"
params:
  sampler: Euler a
  steps: 4
  cfg_scale: [5, 7]
  seed: 11
  width: 64
  height: 64
run:
  progress: quiet
"""


def build_tiny_sdxl(folder: Path):
    """A small SDXL: two CLIP encoders of different widths, the second with a projection,
    text_time added conditioning, linear-projection transformers two deep."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    vocab = len(byte_level_vocab())

    def clip(width, act, cls, projection):
        # bos/eos ids as in the released SDXL configs: eos 2 = pool at the highest id
        return cls(CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=projection, hidden_act=act, bos_token_id=0, eos_token_id=2,
            pad_token_id=1))

    text_encoder = clip(32, "quick_gelu", CLIPTextModel, 32)
    text_encoder_2 = clip(64, "gelu", CLIPTextModelWithProjection, 24)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), cross_attention_dim=32 + 64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64,
        scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler.from_pretrained(families.config_folder("sdxl"),
                                                       subfolder="scheduler")
    write_byte_level_tokenizer(folder / "tok1")
    write_byte_level_tokenizer(folder / "tok2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tok1"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tok2"), unet=unet,
        scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
