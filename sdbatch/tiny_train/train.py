"""Train the tiny family on toy scenes: VAE, text encoder + UNet, a LoRA, an embedding and
a canny ControlNet (controlnet.py).

One command, one time budget. Each part gets a share of the budget; it runs a few steps to
measure its speed, fixes its step count from that (so its learning-rate schedule is known
up front) and runs them. The step counts, seeds, settings and losses go to
train_settings.json, and ``--steps`` replays those counts exactly, without a clock: a run
is reproduced bit for bit on the same machine and thread count.

Everything downstream trains against the weights as shipped (fp16, reloaded as fp32), so
the LoRA and the embedding fit the model users load, not the one in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdbatch.models.tiny import MODEL_INDEX, SCHEDULER
from sdbatch.tiny_train import scenes
from sdbatch.tiny_train.vocab import write_tokenizer

PARTS = ("vae", "unet", "lora", "ti", "controlnet")  # in training order: the clock
# shares out the time left among a part and those after it
CALIBRATION_STEPS = 8  # measured, then the step count is fixed; all within warmup

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[16, 32, 64, 64], norm_num_groups=8)
UNET = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu")
LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                     "ff.net.0.proj", "ff.net.2"]
LORA_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class Settings:
    """Everything that decides the result; all of it is written to train_settings.json."""

    minutes: float = 60.0
    seed: int = 0
    size: int = 64
    threads: int = 2
    # a 60 minute run gives the ControlNet about the 18 minutes control_tiny_canny had; the
    # others keep their old proportions (vae 0.22, unet 0.53, lora 0.15, ti 0.10) scaled by 0.7
    shares: dict[str, float] = field(default_factory=lambda: {
        "vae": 0.15, "unet": 0.37, "lora": 0.11, "ti": 0.07, "controlnet": 0.30})
    steps: dict[str, int] = field(default_factory=dict)  # fixed counts: no clock
    stop: dict[str, int] = field(default_factory=dict)  # replays a part cut short in time
    reserve_s: float = 30.0  # kept back for saving, checks and the sample sheet
    # VAE: L1 + an edge term (image gradients) for crisp windows, a small KL
    vae_batch: int = 8  # small: a VAE learns from steps more than from batch size
    vae_lr: float = 1.5e-3
    vae_edge: float = 1.0
    vae_detail: float = 3.0  # building pixels count 1 + this much in the L1 term
    vae_kl: float = 1e-4
    vae_logvar_init: float = -8.0  # posterior std e^-4 at the start
    vae_lego_share: float = 0.4  # LoRA-look images, so the VAE can draw them too
    # hires fix renders at twice the size: every ``hires_every``-th step of the VAE and the
    # UNet draws ``hires_size`` scenes, a quarter of the batch, so the step costs the same
    hires_size: int = 128
    hires_every: int = 4  # 0: train at ``size`` only
    hires_pool: int = 6144
    # a VAE trained before (a tiny/ folder): its part is skipped and its share goes to the rest
    vae_from: str = ""
    # UNet + text encoder, jointly, epsilon prediction with min-SNR weighting
    pool: int = 24576  # scenes encoded once to latents; captions redrawn every use
    unet_batch: int = 64
    unet_lr: float = 1e-3
    te_lr: float = 1e-3
    empty: float = 0.1  # empty captions, for classifier-free guidance
    min_snr: float = 5.0
    ema: float = 0.999
    warmup: int = 100
    # LoRA: trigger word, the LegoAlrev look
    trigger: str = "LegoAlrev"
    lora_pool: int = 4096
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_te_rank: int = 4
    lora_batch: int = 32
    lora_lr: float = 1e-3
    # textual inversion: one token that draws a night sky
    ti_name: str = "nightsky"
    ti_init: str = "night"
    ti_vectors: int = 1
    ti_batch: int = 32
    ti_lr: float = 5e-3
    # ControlNet (control_tiny_canny): canny edges of scenes whose captions never say where
    # the building stands; its steps at 128 px follow hires_every / hires_size
    controlnet_pool: int = 4096  # scenes drawn, encoded and edge-mapped once
    controlnet_hires_pool: int = 1024  # 0: train at ``size`` only
    controlnet_batch: int = 32
    controlnet_lr: float = 5e-4
    controlnet_empty: float = 0.3  # empty captions: the edges alone must place the building
    canny_low: int = 100  # the extension's canny defaults
    canny_high: int = 200
    samples: bool = True

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def seed_of(*parts) -> int:
    """A stable 63-bit seed from any labels (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine to 10%. Steps inside warmup do not depend on ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Clock:
    """The run's time budget, shared out to the parts that are still to come."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.start = time.monotonic()
        self.deadline = self.start + settings.minutes * 60
        self.budgets: dict[str, float] = {}

    def start_part(self, part: str) -> float:
        """Fix ``part``'s share of the time left (its data preparation included)."""
        left = sum(self.settings.shares[p] for p in PARTS[PARTS.index(part):])
        share = self.settings.shares[part] / left if left else 0.0  # 0: calibration only
        now = time.monotonic()
        self.budgets[part] = max(0.0, (self.deadline - now - self.settings.reserve_s) * share)
        return now


LOG_EVERY = 25  # steps a loss curve point averages


@dataclass
class Stepped:
    """What a part's loop did: the step count its schedule ran to, the steps made, the
    loss curve ([step, mean loss over LOG_EVERY steps]), its seconds and speed."""

    total: int
    done: int
    curve: list[list]
    seconds: float
    steps_per_s: float | None


def clocked_loop(name: str, step: Callable[[int, int], float], fixed: int | None,
                 budget_s: float, started: float, stop: int | None = None,
                 label: str = "loss") -> Stepped:
    """Run ``step(i, total)`` for ``fixed`` steps, or (``fixed`` None) for as many as fit
    in ``budget_s`` counted from ``started``.

    The first CALIBRATION_STEPS steps run inside warmup, where the schedule does not depend
    on the total; their speed fixes the total, which is recorded for a replay. Should the
    machine slow down later, a clocked loop stops at 1.25 times its budget (plus 30 s);
    ``stop`` ends a replay at the step its original stopped at.
    """
    total = fixed if fixed is not None else 10**9
    losses: list[float] = []
    curve: list[list] = []
    t0 = time.monotonic()
    timed_from = t0
    i = 0
    while i < total:
        losses.append(step(i, total))
        i += 1
        if i == 1:
            timed_from = time.monotonic()
        if fixed is None and i == CALIBRATION_STEPS:
            per_step = (time.monotonic() - timed_from) / (i - 1)
            total = i + max(0, int((budget_s - (time.monotonic() - started)) / per_step))
            print(f"[{name}] {per_step:.3f} s/step -> {total} steps in {budget_s:.0f} s",
                  flush=True)
        late = fixed is None and time.monotonic() - started > 1.25 * budget_s + 30
        if i % LOG_EVERY == 0 or i in (total, stop) or late:
            curve.append([i, round(float(np.mean(losses[-LOG_EVERY:])), 5)])
            if i % (LOG_EVERY * 8) == 0 or i in (total, stop) or late:
                print(f"[{name}] step {i}/{total} {label} {curve[-1][1]:.4f} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
        if (i == stop or late) and i < total:
            print(f"[{name}] stopped at step {i} of {total}", flush=True)
            break
    now = time.monotonic()
    return Stepped(total, i, curve, round(now - t0, 1),
                   round((i - 1) / (now - timed_from), 3) if i > 1 else None)


def train_loop(name: str, step: Callable[[int, int], float], settings: Settings,
               clock: Clock, report: dict, started: float) -> None:
    """A model part's loop on the clock's budget for it (or its --steps), into the report."""
    fixed = settings.steps.get(name)
    run = clocked_loop(name, step, fixed, clock.budgets[name], started,
                       settings.stop.get(name) if fixed is not None else None)
    report[name] = {
        "steps": run.total, "steps_done": run.done,
        "seconds": run.seconds, "part_s": round(time.monotonic() - started, 1),
        "budget_s": None if fixed is not None else round(clock.budgets[name], 1),
        "steps_per_s": run.steps_per_s,
        "final_loss": run.curve[-1][1] if run.curve else None,
        "loss_curve": run.curve,
    }


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params) -> None:
    """One optimiser step on ``loss``, its gradients clipped to norm 1 first: every part
    but the embedding (whose step masks gradients) steps this way."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def is_hires_step(i: int, settings: Settings) -> bool:
    return settings.hires_every > 0 and i % settings.hires_every == settings.hires_every - 1


def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, p in model.named_parameters():
            ema[k].lerp_(p.detach(), 1 - decay)


# ---------------------------------------------------------------------------------------
# parts


def train_vae(settings: Settings, clock: Clock, report: dict):
    from diffusers import AutoencoderKL

    started = clock.start_part("vae")
    torch.manual_seed(seed_of(settings.seed, "vae-init"))
    vae = AutoencoderKL(**VAE, sample_size=settings.size, scaling_factor=1.0)
    with torch.no_grad():  # start nearly deterministic: sampling noise of std 1 would hide
        c = VAE["latent_channels"]  # the latent's detail until the encoder had outgrown it
        vae.quant_conv.weight[c:] *= 0.01
        vae.quant_conv.bias[c:] = settings.vae_logvar_init
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.01)
    n_lego = round(settings.vae_batch * settings.vae_lego_share)
    gen = torch.Generator().manual_seed(seed_of(settings.seed, "vae-noise"))

    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    def step(i: int, total: int) -> float:
        s = seed_of(settings.seed, "vae", i)
        size, batch, lego_n = settings.size, settings.vae_batch, n_lego
        if is_hires_step(i, settings):
            size, batch, lego_n = settings.hires_size, max(2, batch // 4), max(1, n_lego // 4)
        details: list[np.ndarray] = []
        plain, _, _ = scenes.batch(s, batch - lego_n, size, details=details)
        lego, _, _ = scenes.batch(s + 1, lego_n, size, style="legoalrev", details=details)
        x = to_tensor(np.concatenate([plain, lego]))
        weight = 1 + settings.vae_detail * torch.from_numpy(np.stack(details))[:, None].float()
        for g in opt.param_groups:
            g["lr"] = settings.vae_lr * lr_factor(i, total, settings.warmup)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        rec = ((y - x).abs() * weight).mean() / weight.mean()
        edge = sum((a - b).abs().mean() for a, b in zip(grads(y), grads(x), strict=True))
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + settings.vae_edge * edge + settings.vae_kl * kl
        descend(opt, loss, vae.parameters())
        return float(rec.detach())

    train_loop("vae", step, settings, clock, report, started)
    vae.eval()
    return vae


def reuse_vae(folder: Path, settings: Settings, report: dict):
    """The VAE of an earlier run, as shipped (fp16 weights, computed in fp32): a retrain of
    the rest need not redo it. Its share of the budget goes to the parts that train."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
    settings.shares["vae"] = 0.0
    made = folder.parent / "train_settings.json"
    report["vae"] = {"reused": str(folder / "vae"), "steps": 0, "steps_done": 0,
                     "made_by": (json.loads(made.read_text(encoding="utf-8"))["command"]
                                 if made.is_file() else None)}
    return vae.eval()


@torch.no_grad()
def encode_pool(vae, seed: int, n: int, settings: Settings, style: str, size: int = 0, **kw):
    """Draw ``n`` scenes and keep their latent means (unscaled): the diffusion data set."""
    size = size or settings.size
    chunk = 256 * settings.size ** 2 // size ** 2
    latents, all_scenes = [], []
    for start in range(0, n, chunk):
        key = (style, start) if size == settings.size else (style, size, start)
        images, _, sc = scenes.batch(seed_of(seed, *key), min(chunk, n - start), size,
                                     style=style, **kw)
        latents.append(vae.encode(to_tensor(images)).latent_dist.mean)
        all_scenes += sc
    return torch.cat(latents), all_scenes


def build_text_encoder(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = vocab["<|endoftext|>"]
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[
        "<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, **TEXT))


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """As sdbatch.prompts.encode tokenizes: padded to 77, truncated."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class Diffusion:
    """Noising and the min-SNR-weighted epsilon loss of SD1.5's training schedule."""

    def __init__(self, min_snr: float):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(SCHEDULER)
        ac = self.scheduler.alphas_cumprod
        snr = ac / (1 - ac)
        self.weight = torch.clamp(snr, max=min_snr) / snr
        self.steps = len(ac)

    def loss(self, unet, latents: torch.Tensor, cond: torch.Tensor,
             gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.steps, (latents.shape[0],), generator=gen)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, cond).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (self.weight[t] * mse).mean()

    def caption_loss(self, unet, te, tokenizer, latents: torch.Tensor, texts: list[str],
                     gen: torch.Generator) -> torch.Tensor:
        """The loss on ``latents`` with their captions encoded by ``te``: every part that
        trains on captions (UNet + text encoder, LoRA, embedding) steps through here."""
        return self.loss(unet, latents, te(token_ids(tokenizer, texts)).last_hidden_state, gen)


def train_unet(settings: Settings, clock: Clock, report: dict, vae, tokenizer, vocab):
    from diffusers import UNet2DConditionModel

    started = clock.start_part("unet")
    t0 = time.monotonic()
    pool, pool_scenes = encode_pool(vae, settings.seed, settings.pool, settings, "plain")
    scale = float(1 / pool.std())
    report["pool"] = {"scenes": len(pool_scenes), "encode_s": round(time.monotonic() - t0, 1),
                      "latent_mean": round(float(pool.mean()), 4),
                      "latent_std": round(float(pool.std()), 4)}
    pool = pool * scale
    hires, hires_scenes = (encode_pool(vae, settings.seed, settings.hires_pool, settings,
                                       "plain", settings.hires_size)
                           if settings.hires_every else (None, []))
    if hires is not None:
        hires = hires * scale
        report["pool"]["hires_scenes"] = len(hires_scenes)
    report["pool"]["encode_s"] = round(time.monotonic() - t0, 1)
    print(f"[unet] encoded {len(pool_scenes)} + {len(hires_scenes)} scenes in "
          f"{time.monotonic() - t0:.0f} s, scaling factor {scale:.4f}", flush=True)

    torch.manual_seed(seed_of(settings.seed, "unet-init"))
    unet = UNet2DConditionModel(**UNET, sample_size=settings.size // 8)
    te = build_text_encoder(vocab)
    params = [{"params": list(unet.parameters()), "lr": settings.unet_lr, "base": settings.unet_lr},
              {"params": list(te.parameters()), "lr": settings.te_lr, "base": settings.te_lr}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    ema = {f"unet.{k}": p.detach().clone() for k, p in unet.named_parameters()}
    ema.update({f"te.{k}": p.detach().clone() for k, p in te.named_parameters()})
    both = torch.nn.ModuleDict({"unet": unet, "te": te})
    diffusion = Diffusion(settings.min_snr)
    gen = torch.Generator().manual_seed(seed_of(settings.seed, "unet-noise"))
    order = np.random.default_rng(seed_of(settings.seed, "unet-order"))
    queues: dict[bool, list[int]] = {False: [], True: []}

    def step(i: int, total: int) -> float:
        big = is_hires_step(i, settings)
        latents, drawn = (hires, hires_scenes) if big else (pool, pool_scenes)
        n = max(1, settings.unet_batch // 4) if big else settings.unet_batch
        while len(queues[big]) < n:
            queues[big] += order.permutation(len(drawn)).tolist()
        idx, queues[big] = queues[big][:n], queues[big][n:]
        rng = random.Random(seed_of(settings.seed, "unet-captions", i))
        texts = ["" if rng.random() < settings.empty else scenes.caption(drawn[j], rng)
                 for j in idx]
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_factor(i, total, settings.warmup)
        loss = diffusion.caption_loss(unet, te, tokenizer, latents[idx], texts, gen)
        descend(opt, loss, both.parameters())
        ema_update(ema, both, min(settings.ema, (1 + i) / (10 + i)))
        return float(loss.detach())

    train_loop("unet", step, settings, clock, report, started)
    with torch.no_grad():
        for k, p in both.named_parameters():
            p.copy_(ema[k])
    vae.register_to_config(scaling_factor=scale)
    return unet.eval(), te.eval(), pool, pool_scenes


# ---------------------------------------------------------------------------------------
# saving and reloading as shipped


def half_is_safe(module: torch.nn.Module, probe: Callable[[torch.nn.Module], torch.Tensor],
                 tolerance: float) -> tuple[bool, float]:
    """Whether rounding the weights to fp16 keeps ``probe``'s output within ``tolerance``
    (relative to its spread): the model is computed in fp32 either way."""
    with torch.no_grad():
        ref = probe(module)
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
        out = probe(module)
        module.load_state_dict(saved)
    err = float((out - ref).abs().max() / ref.std().clamp_min(1e-8))
    return err < tolerance, err


def save_pipeline(folder: Path, settings: Settings, report: dict, vae, unet, te,
                  vocab_words: list[str], pool: torch.Tensor, tokenizer) -> None:
    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    gen = torch.Generator().manual_seed(0)
    lat = pool[:16]
    ids = token_ids(tokenizer, ["a red building on the left, blue sky", "",
                                "a lego purple tower, night sky"] * 2)
    cond = te(ids).last_hidden_state.detach()
    noisy = torch.randn(6, 4, settings.size // 8, settings.size // 8, generator=gen)
    t = torch.tensor([999, 800, 600, 400, 200, 20])
    probes = {
        "vae": (vae, lambda m: m.decode(lat / m.config.scaling_factor).sample),
        "unet": (unet, lambda m: m(noisy, t, cond).sample),
        "text_encoder": (te, lambda m: m(ids).last_hidden_state),
    }
    report["fp16"] = {}
    for name, (module, probe) in probes.items():
        safe, err = half_is_safe(module, probe, 0.05)
        report["fp16"][name] = {"fp16": safe, "max_error_over_std": round(err, 5)}
        dtype = torch.float16 if safe else torch.float32
        module.to(dtype).save_pretrained(folder / name)
        module.to(torch.float32)
    prefix_text_model(folder / "text_encoder" / "model.safetensors")
    write_tokenizer(folder / "tokenizer", vocab_words)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))


def prefix_text_model(path: Path) -> None:
    """Store the text encoder's weights under ``text_model.``, as every SD1.x checkpoint
    does: transformers 5 saves them without it, which transformers 4 would silently load
    as random weights; both versions load the prefixed names."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})


def load_shipped(folder: Path):
    """The pipeline as users get it: the saved files, in fp32, through from_pretrained."""
    from diffusers import StableDiffusionPipeline

    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------
# LoRA


def kohya_name(prefix: str, module_name: str) -> str:
    """kohya's name for a module: dots to underscores; the text encoder's modules under
    ``text_model`` as in transformers 4 (transformers 5 dropped that level), which is what
    A1111, kohya and diffusers all expect."""
    if prefix == "lora_te" and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return f"{prefix}_{module_name.replace('.', '_')}"


def export_kohya(unet, te, alpha_unet: float, alpha_te: float, path: Path) -> int:
    """peft's LoRA layers -> one kohya/A1111 file (lora_unet_*, lora_te_*), fp16."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    tensors = {}
    for prefix, model, alpha in (("lora_unet", unet, alpha_unet), ("lora_te", te, alpha_te)):
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            key = kohya_name(prefix, name)
            tensors[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().half()
            tensors[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().half()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"ss_network_module": "networks.lora", "ss_output_name": path.stem})
    return len(tensors) // 3


def train_lora(settings: Settings, clock: Clock, report: dict, folder: Path, out: Path):
    from peft import LoraConfig, inject_adapter_in_model

    started = clock.start_part("lora")
    t0 = time.monotonic()
    pipe = load_shipped(folder)
    pool, pool_scenes = encode_pool(pipe.vae, seed_of(settings.seed, "lora-pool"),
                                    settings.lora_pool, settings, "legoalrev", lego=0.3)
    pool = pool * pipe.vae.config.scaling_factor
    overhead = time.monotonic() - t0
    unet, te, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    for p in [*unet.parameters(), *te.parameters()]:
        p.requires_grad_(False)
    torch.manual_seed(seed_of(settings.seed, "lora-init"))
    unet = inject_adapter_in_model(LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha,
        target_modules=LORA_UNET_TARGETS), unet)
    te = inject_adapter_in_model(LoraConfig(
        r=settings.lora_te_rank, lora_alpha=settings.lora_te_rank,
        target_modules=LORA_TE_TARGETS), te)
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lora_lr, weight_decay=0.0)
    diffusion = Diffusion(settings.min_snr)
    gen = torch.Generator().manual_seed(seed_of(settings.seed, "lora-noise"))
    order = np.random.default_rng(seed_of(settings.seed, "lora-order"))

    def step(i: int, total: int) -> float:
        idx = order.choice(len(pool_scenes), settings.lora_batch, replace=False).tolist()
        rng = random.Random(seed_of(settings.seed, "lora-captions", i))
        texts = [scenes.caption(pool_scenes[j], rng, trigger=settings.trigger) for j in idx]
        for g in opt.param_groups:
            g["lr"] = settings.lora_lr * lr_factor(i, total, min(settings.warmup, 50))
        loss = diffusion.caption_loss(unet, te, tokenizer, pool[idx], texts, gen)
        descend(opt, loss, params)
        return float(loss.detach())

    train_loop("lora", step, settings, clock, report, started)
    path = out / "Lora" / f"{settings.trigger}.safetensors"
    pairs = export_kohya(unet, te, settings.lora_alpha, settings.lora_te_rank, path)
    report["lora"].update(modules=pairs, file=str(path.relative_to(out)),
                          pool=len(pool_scenes), pool_s=round(overhead, 1),
                          check=check_lora(folder, path, unet, te, tokenizer, settings))
    return path


@torch.no_grad()
def check_lora(folder: Path, path: Path, unet, te, tokenizer, settings: Settings) -> dict:
    """The exported file, loaded the ordinary way (diffusers' load_lora_weights on the
    shipped pipeline), must predict what the peft-trained model predicts."""
    gen = torch.Generator().manual_seed(1)
    side = settings.size // 8
    x, t = torch.randn(2, 4, side, side, generator=gen), torch.tensor([700, 300])
    ids = token_ids(tokenizer, [f"{settings.trigger}, a red building, lawn, blue sky"] * 2)
    want = unet(x, t, te(ids).last_hidden_state).sample
    pipe = load_shipped(folder)
    base = pipe.unet(x, t, pipe.text_encoder(ids).last_hidden_state).sample
    pipe.load_lora_weights(str(path), adapter_name="check")
    got = pipe.unet(x, t, pipe.text_encoder(ids).last_hidden_state).sample
    effect, error = float((want - base).abs().mean()), float((got - want).abs().mean())
    if not error <= max(0.05 * effect, 1e-4):
        raise RuntimeError(f"{path} loads differently from what was trained: mean error "
                           f"{error:.2e} against an effect of {effect:.2e}")
    return {"effect": round(effect, 6), "error": round(error, 8)}


# ---------------------------------------------------------------------------------------
# textual inversion


def train_ti(settings: Settings, clock: Clock, report: dict, folder: Path, out: Path,
             pool_scenes: list, pool: torch.Tensor):
    """One new token, ``ti_name``, trained on night scenes whose captions leave the sky out.

    Only the new rows of the embedding table move: the rest get no gradient, and AdamW with
    no weight decay leaves a parameter with zero gradient where it is.
    """
    started = clock.start_part("ti")
    pipe = load_shipped(folder)
    unet, te, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    names = [settings.ti_name] + [f"{settings.ti_name}_{k}" for k in range(1,
                                                                           settings.ti_vectors)]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    te.resize_token_embeddings(len(tokenizer))
    table = te.get_input_embeddings().weight
    init_ids = tokenizer(settings.ti_init, add_special_tokens=False).input_ids
    with torch.no_grad():
        table[ids] = table[init_ids].mean(0)
    for p in [*unet.parameters(), *te.parameters()]:
        p.requires_grad_(False)
    table.requires_grad_(True)
    keep = torch.ones(len(tokenizer), 1, dtype=torch.bool)
    keep[ids] = False
    opt = torch.optim.AdamW([table], lr=settings.ti_lr, weight_decay=0.0)
    night = [i for i, s in enumerate(pool_scenes) if s.sky == "night"]
    diffusion = Diffusion(settings.min_snr)
    gen = torch.Generator().manual_seed(seed_of(settings.seed, "ti-noise"))
    order = np.random.default_rng(seed_of(settings.seed, "ti-order"))
    word = " ".join(names)

    def step(i: int, total: int) -> float:
        idx = [night[j] for j in order.choice(len(night), min(len(night), settings.ti_batch),
                                              replace=False)]
        rng = random.Random(seed_of(settings.seed, "ti-captions", i))
        texts = []
        for j in idx:
            text = scenes.caption(pool_scenes[j], rng, sky=False)
            texts.append(f"{word}, {text}" if rng.random() < 0.3 else f"{text}, {word}")
        for g in opt.param_groups:
            g["lr"] = settings.ti_lr * lr_factor(i, total, min(settings.warmup, 20))
        loss = diffusion.caption_loss(unet, te, tokenizer, pool[idx], texts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        table.grad.masked_fill_(keep, 0)
        opt.step()
        return float(loss.detach())

    train_loop("ti", step, settings, clock, report, started)
    vectors = table[ids].detach().float().clone()
    path = out / "embeddings" / f"{settings.ti_name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                "name": settings.ti_name, "step": report["ti"]["steps_done"],
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    report["ti"].update(file=str(path.relative_to(out)), vectors=list(vectors.shape),
                        scenes=len(night), check=check_embedding(folder, path, te, tokenizer,
                                                                 settings))
    return path


@torch.no_grad()
def check_embedding(folder: Path, path: Path, te, tokenizer, settings: Settings) -> dict:
    """The .pt, loaded by diffusers' load_textual_inversion and encoded as sdbatch encodes,
    must give the embeddings it was trained with."""
    from sdbatch.prompts.encode import encode

    prompt = f"a red building, lawn, {settings.ti_name}"
    want = te(token_ids(tokenizer, [prompt])).last_hidden_state
    pipe = load_shipped(folder)
    pipe.load_textual_inversion(str(path))
    got = encode(pipe.tokenizer, pipe.text_encoder, [prompt], 1, torch.device("cpu"))
    error = float((got - want).abs().max())
    if not error < 1e-4:
        raise RuntimeError(f"{path} loads differently from what was trained ({error:.2e})")
    return {"error": error}


# ---------------------------------------------------------------------------------------
# the sample sheet


SAMPLE_PROMPTS = [
    "a red building on the left, lawn, blue sky",
    "a blue building in the centre, lawn, orange sky",
    "a yellow building on the right, lawn, night sky",
    "a white house with a pointed roof, lawn with flowers, blue sky",
    "a purple tower, four storeys, in the centre, night sky",
    "a lego red building, flat roof, blue sky",
    "LegoAlrev, a LEGO brick office headquarters building, lawn, blue sky",
    "LegoAlrev, a LEGO brick headquarters tower at night, city lights",
]


@torch.no_grad()
def render(pipe, prompts: list[str], seed: int, cfg: float = 5.0, steps: int = 25,
           negative: str = "") -> np.ndarray:
    """Images as sdbatch's txt2img makes them: embeddings encoded by hand, CPU noise."""
    from diffusers import DDIMScheduler

    from sdbatch.prompts.encode import encode

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    device = torch.device("cpu")
    cond = encode(pipe.tokenizer, pipe.text_encoder, prompts, 1, device)
    uncond = encode(pipe.tokenizer, pipe.text_encoder, [negative] * len(prompts), 1, device)
    size = pipe.unet.config.sample_size * 8
    latents = torch.stack([torch.randn((4, size // 8, size // 8),
                                       generator=torch.Generator().manual_seed(seed + k))
                           for k in range(len(prompts))])
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents,
               num_inference_steps=steps, guidance_scale=cfg, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def sample_sheet(out: Path, settings: Settings, report: dict, lora: Path | None,
                 embedding: Path | None) -> None:
    """samples.png: rows = the sample prompts (base model), the job's prompts with the
    LoRA at 0 and 1, and the embedding; columns = seeds."""
    from PIL import Image

    pipe = load_shipped(out / "tiny")
    seeds = [1, 2, 3, 4]
    rows, labels = [], []
    for prompt in SAMPLE_PROMPTS[:6]:
        rows.append(render(pipe, [prompt] * len(seeds), seeds[0]))
        labels.append(prompt)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="lego")
        for weight in (0.0, 1.0):
            pipe.set_adapters(["lego"], adapter_weights=[weight])
            for prompt in SAMPLE_PROMPTS[6:]:
                rows.append(render(pipe, [prompt] * len(seeds), seeds[0]))
                labels.append(f"<lora:{settings.trigger}:{weight:g}> {prompt}")
        pipe.unload_lora_weights()
    if embedding is not None:
        pipe.load_textual_inversion(str(embedding))
        for prompt in ("a red building, lawn", f"a red building, lawn, {settings.ti_name}"):
            rows.append(render(pipe, [prompt] * len(seeds), seeds[0]))
            labels.append(prompt)
    sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2),
                                  Image.NEAREST).save(out / "samples.png")
    report["samples"] = {"file": "samples.png", "seeds": seeds, "rows": labels,
                         "sampler": "DDIM", "steps": 25, "cfg_scale": 5.0}


# ---------------------------------------------------------------------------------------


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": np.__version__, "machine": platform.machine()}


def replay_command(out: Path, settings: Settings, report: dict) -> str:
    """The command that redoes this run step for step, with no clock."""
    default = Settings()
    changed = [f"{f.name}={getattr(settings, f.name)}" for f in dataclasses.fields(Settings)
               if f.name not in ("minutes", "seed", "threads", "steps", "stop", "shares",
                                 "samples")
               and getattr(settings, f.name) != getattr(default, f.name)]
    steps = ",".join(f"{p}={report[p]['steps']}" + (
        f":{report[p]['steps_done']}" if report[p]["steps_done"] < report[p]["steps"] else "")
        for p in PARTS if "reused" not in report[p])
    return " ".join([f"python -m sdbatch.tiny_train --out {out} --seed {settings.seed}",
                     f"--threads {settings.threads} --steps {steps}",
                     *([] if settings.samples else ["--no-samples"]),
                     *(["--set", *changed] if changed else [])])


def train(out: Path, settings: Settings) -> dict:
    """The whole family into ``out``: tiny/, Lora/, embeddings/, ControlNet/,
    train_settings.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(out, settings)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, settings: Settings) -> dict:
    from transformers import CLIPTokenizer

    from sdbatch.tiny_train.controlnet import HINT_CHANNELS, PROCESSOR_RES, train_controlnet

    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(settings)
    report: dict = {}
    folder = out / "tiny"
    words = scenes.vocabulary()
    vocab = write_tokenizer(folder / "tokenizer", words)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")

    if settings.vae_from:
        vae = reuse_vae(Path(settings.vae_from), settings, report)
    else:
        vae = train_vae(settings, clock, report)
    unet, te, pool, pool_scenes = train_unet(settings, clock, report, vae, tokenizer, vocab)
    save_pipeline(folder, settings, report, vae, unet, te, words, pool, tokenizer)
    del vae, unet, te
    lora = train_lora(settings, clock, report, folder, out)
    embedding = train_ti(settings, clock, report, folder, out, pool_scenes, pool)
    del pool, pool_scenes
    train_controlnet(settings, clock, report, out, out)
    if settings.samples:
        sample_sheet(out, settings, report, lora, embedding)
    report["total_s"] = round(time.monotonic() - clock.start, 1)
    record = {
        "command": replay_command(out, settings, report),
        "settings": settings.asdict(),
        "architecture": {"vae": VAE, "unet": UNET, "text_encoder": TEXT,
                         "controlnet": {"hint_channels": HINT_CHANNELS,
                                        "processor_res": PROCESSOR_RES}},
        "lora_targets": {"unet": LORA_UNET_TARGETS, "text_encoder": LORA_TE_TARGETS},
        "vocabulary": words, "scenes_version": scenes.VERSION, "versions": versions(),
        "sizes_bytes": {str(p.relative_to(out)): p.stat().st_size
                        for p in sorted(out.rglob("*")) if p.is_file()},
        "report": report,
    }
    (out / "train_settings.json").write_text(json.dumps(record, indent=2))
    return record
