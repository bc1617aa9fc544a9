"""LoRA files in the kohya / A1111 format (lora_unet_*, lora_te_*, lora_te1_/lora_te2_ for SDXL).

Each plain LoRA file is loaded once into the pipeline as a named peft adapter; a batch then
only picks the active adapters and their weights, so a sweep over LoRA weights never reloads
a model. LyCORIS and DoRA files (and plain ones diffusers cannot place whole) are merged
as weight deltas instead (see lycoris.py), with the same per-batch weights.
Files are checked against the pipeline before anything renders: a LoRA for another model
family would otherwise load with its keys silently ignored, or fail halfway through a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdbatch.models import lycoris, safetensors_header
from sdbatch.models.networks_errors import NetworkError

__all__ = ["NetworkError", "LoraSet", "Weight", "check_lora", "lora_hash",
           "model_family", "part_weights", "write_kohya_lora"]

FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}  # by the UNet's cross-attention width
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A",
               "lora_embedding_B", "lora_magnitude_vector"}


# ---- reading and hashing -------------------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a .safetensors file, without reading its tensors."""
    path = Path(path)
    try:
        header, start = safetensors_header.read(path)
        end = start + max((v["data_offsets"][1] for k, v in header.items()
                           if k != "__metadata__"), default=0)
        if end > path.stat().st_size:
            raise ValueError(f"cut short: its tensors end at byte {end}, the file at "
                             f"{path.stat().st_size}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NetworkError(f"{path}: not a readable .safetensors file ({e}); download it again "
                           "or convert it to safetensors") from e
    metadata = header.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, metadata


def _shapes_and_metadata(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_header(path)
    state = _load_pickled(path)
    return {k: tuple(v.shape) for k, v in state.items()}, {}


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs code to load is refused, by design
        raise NetworkError(f"{path}: cannot be read safely as a LoRA ({type(e).__name__}: "
                           f"{e}); convert it to .safetensors") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise NetworkError(f"{path}: not a LoRA state dict; use a kohya/A1111 LoRA file")
    return state


_hash_cache: dict[tuple[str, int, int], str] = {}


def _addnet_sha256(path: Path) -> str:
    """sha256 of the bytes after the safetensors header: unchanged when only metadata changes."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        start = safetensors_header.read(path)[1]
        with open(path, "rb") as f:
            f.seek(start)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def lora_hash(path: Path) -> str:
    """The WebUI's "Lora hashes" value for a file, so Civitai can link the LoRA from a PNG.

    The trainer's own sshs_model_hash metadata wins; else the first 12 hex of the sha256 of
    the bytes after the safetensors header (a whole-file sha256 for .pt files).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        _, metadata = read_safetensors_header(path)
        if metadata.get("sshs_model_hash"):
            return metadata["sshs_model_hash"][:12]
        return _addnet_sha256(path)[:12]
    from sdbatch.models import hashing

    return hashing.sha256(path)[:12]


# ---- module names as kohya writes them -----------------------------------------------------

_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)  # what LyCORIS's norm modules name


def _base_modules(model: torch.nn.Module, kinds: tuple[type, ...] = _LAYERS
                  ) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, Linear/Conv2d) pairs of a model, seeing through peft's LoRA wrappers."""
    for name, module in model.named_modules():
        if _PEFT_PARTS.intersection(name.split(".")):
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, kinds) and getattr(base, "weight", None) is not None:
            yield name, base


def _kohya(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


def _sgm_name(name: str, unet) -> str | None:
    """A diffusers UNet module name in the original (sgm) layout kohya uses for SDXL."""
    per = unet.config.layers_per_block
    per = per if isinstance(per, int) else per[0]
    rest: list[str]
    parts = name.split(".")
    simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if name in simple:
        return simple[name]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
    if parts[0] == "down_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * (per + 1) + per}.0.op"
        block = f"input_blocks.{1 + b * (per + 1) + i}.{0 if kind == 'resnets' else 1}"
    elif parts[0] == "mid_block":
        kind, i, rest = parts[1], int(parts[2]), parts[3:]
        block = {("resnets", 0): "middle_block.0", ("attentions", 0): "middle_block.1",
                 ("resnets", 1): "middle_block.2"}.get((kind, i))
        if block is None:
            return None
    elif parts[0] == "up_blocks":
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            has_attention = hasattr(unet.up_blocks[b], "attentions")
            return f"output_blocks.{b * (per + 1) + per}.{2 if has_attention else 1}.conv"
        block = f"output_blocks.{b * (per + 1) + i}.{0 if kind == 'resnets' else 1}"
    else:
        return None
    if kind == "resnets":
        rest = [resnet.get(".".join(rest), ".".join(rest))]
    return ".".join([block, *rest])


def kohya_modules(pipe, norms: bool = False) -> dict[str, torch.nn.Module]:
    """Every module a kohya LoRA can name in this pipeline, by its kohya name (with norms:
    the GroupNorm / LayerNorm layers too, which LyCORIS norm modules name).

    UNet names exist in both layouts kohya writes (diffusers names for SD1.x/SD2.x, the
    original sgm names for SDXL); text encoders as lora_te_ (SD1.x/SD2.x) or lora_te1_ /
    lora_te2_ (SDXL), always with the text_model_ part that CLIP modules had when they
    were trained, whether or not this transformers version still has it.
    """
    kinds = _LAYERS + _NORMS if norms else _LAYERS
    table: dict[str, torch.nn.Module] = {}
    for name, module in _base_modules(pipe.unet, kinds):
        table[_kohya("lora_unet_", name)] = module
        if (sgm := _sgm_name(name, pipe.unet)) is not None:
            table[_kohya("lora_unet_", sgm)] = module
    encoders = [("text_encoder", "lora_te_")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")]
    for attr, prefix in encoders:
        encoder = getattr(pipe, attr, None)
        if encoder is None:
            continue
        for name, module in _base_modules(encoder, kinds):
            if not name.startswith("text_model."):
                name = "text_model." + name
            table[_kohya(prefix, name)] = module
    return table


# ---- checking --------------------------------------------------------------------------------

def context_width(pipe) -> int:
    return int(pipe.unet.config.cross_attention_dim)


def model_family(pipe) -> str:
    """SD1.x / SD2.x / SDXL, told from the UNet's cross-attention width as the WebUI does."""
    width = context_width(pipe)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "SDXL" if width == 2048 else f"SDXL-like (cross-attention width {width})"
    return FAMILIES.get(width, f"SD1.x-like (cross-attention width {width})")


def _lora_modules(path: Path, shapes: dict[str, tuple[int, ...]]
                  ) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, _, part = key.partition(".")
        if not name.startswith(PREFIXES):
            raise NetworkError(f"{path}: key {key!r} is not a kohya/A1111 LoRA key (lora_unet_*, "
                               "lora_te_*); this file is another kind of network or LoRA "
                               "format: use a kohya-format LoRA")
        modules.setdefault(name, {})[part] = shape
    return modules


def _lora_facts(modules) -> tuple[bool, int | None]:
    """(has SDXL text-encoder keys, cross-attention width the LoRA was trained on)."""
    sdxl_te = any(n.startswith(("lora_te1_", "lora_te2_")) for n in modules)
    width = None
    for name, parts in modules.items():
        if re.search(r"attn2_to_[kv]$", name) and "lora_down.weight" in parts:
            width = parts["lora_down.weight"][1]
            break
    return sdxl_te, width


def check_lora(path: Path, pipe) -> None:
    """Raise NetworkError unless every module of the file exists in the pipeline with its shape.

    Called before anything renders: the WebUI would silently skip what does not fit.
    """
    _checked(path, pipe)


def _checked(path: Path, pipe) -> tuple[dict[str, dict[str, tuple[int, ...]]],
                                        dict[str, torch.nn.Module]]:
    """check_lora's work: the file's modules (name -> part -> shape) and the layer table."""
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"{path}: no such LoRA file; check the path (a .safetensors file)")
    shapes, _ = _shapes_and_metadata(path)
    modules = _lora_modules(path, shapes)
    if not modules:
        raise NetworkError(f"{path}: holds no LoRA weights; use a kohya/A1111 LoRA file")
    if unknown := [f"{name}.{part}" for name, parts in sorted(modules.items())
                   if lycoris.module_kind(parts) is None for part in sorted(parts)]:
        raise lycoris.unplaced_error(path, unknown)
    family = model_family(pipe)
    sdxl_te, width = _lora_facts(modules)
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl_te and not is_sdxl:
        made = "SDXL (it has lora_te1_/lora_te2_ keys for two text encoders)"
        raise NetworkError(f"{path}: this LoRA was made for {made}; the checkpoint is {family}. "
                           f"Use a LoRA made for {family}, or render with an SDXL checkpoint")
    if width is not None and width != context_width(pipe):
        made = FAMILIES.get(width, f"a model with cross-attention width {width}")
        raise NetworkError(f"{path}: this LoRA was made for {made} (cross-attention width "
                           f"{width}); the checkpoint is {family} (width {context_width(pipe)}). "
                           f"Use a LoRA made for {family}, or a checkpoint of its family")
    table = kohya_modules(pipe, norms=True)
    missing, wrong = [], []
    for name, parts in sorted(modules.items()):
        module = table.get(name)
        if module is None:
            missing.append(name)
            continue
        shape = tuple(module.weight.shape)
        kind = lycoris.module_kind(parts)
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if kind == "lora" and "lora_mid.weight" not in parts:
            if len(shape) < 2:
                wrong.append(f"{name}: LoRA {down[1]}->{up[0]}, model a norm layer")
            elif down[1] != shape[1] or up[0] != shape[0] or down[0] != up[1]:
                wrong.append(f"{name}: LoRA {down[1]}->{up[0]}, model {shape[1]}->{shape[0]}")
        elif not lycoris.fits(kind, parts, module.weight, getattr(module, "bias", None)):
            wrong.append(f"{name}: {lycoris.NAMES[kind]} of shape "
                         f"{lycoris.delta_shape(kind, parts)}, model {shape}")
    if missing:
        raise NetworkError(f"{path}: {len(missing)} of its {len(modules)} modules exist nowhere "
                           f"in this {family} checkpoint (e.g. {', '.join(missing[:3])}); it "
                           "was made for another model architecture: use a LoRA made for this "
                           "checkpoint")
    if wrong:
        raise NetworkError(f"{path}: {len(wrong)} module(s) do not fit this {family} checkpoint "
                           f"({'; '.join(wrong[:3])}); use a LoRA made for this checkpoint")
    return modules, table


# ---- applying --------------------------------------------------------------------------------

Weight = float | tuple[float, float]  # one weight for the whole LoRA, or (text encoder, UNet)


def part_weights(weight: Weight) -> tuple[float, float]:
    """(text encoder, UNet) weights of a LoRA weight as a job gives it."""
    if isinstance(weight, tuple | list):
        te, unet = weight
        return float(te), float(unet)
    return float(weight), float(weight)


@dataclass
class _PipeLoras:
    adapters: dict[Path, str] = field(default_factory=dict)  # resolved file -> adapter name
    active: dict[str, tuple[float, float]] | None = None  # adapter -> (te, unet) now set
    fused: dict[str, tuple[float, float]] | None = None  # the adapters fused in now
    saved: dict = field(default_factory=dict)  # fused layer -> its own weight, kept on the CPU
    deltas: dict[str, lycoris.DeltaNetwork] = field(default_factory=dict)  # by adapter name
    merged: lycoris.MergedDeltas = field(default_factory=lycoris.MergedDeltas)
    used: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recent first


# loaded networks kept beyond the set in use (an axis over many LoRA files would otherwise
# hold every one of them, on the GPU for adapters, until the stack goes)
KEEP_UNUSED = 4


_per_pipe: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LoraSet:
    """The LoRAs of one loaded pipeline: each file loaded once, weights set per batch.

    Every LoraSet of the same pipeline shares one state, so two of them can neither load a
    file twice nor disagree about which adapters are active.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._state = _per_pipe.setdefault(pipe, _PipeLoras())

    @property
    def adapters(self) -> dict[Path, str]:
        return self._state.adapters

    def load(self, path: Path) -> str:
        """Check and load a file (once): a plain LoRA as a peft adapter, anything else, or a
        plain LoRA diffusers does not place whole, as deltas; return its name."""
        key = Path(path).resolve()
        if key in self.adapters:
            return self.adapters[key]
        modules, table = _checked(path, self.pipe)
        name = re.sub(r"\W", "_", key.stem) or "lora"
        taken = set(self.adapters.values())
        taken.update(n for names in self.pipe.get_list_adapters().values() for n in names)
        name = next(n for n in (name, *(f"{name}_{i}" for i in range(2, 10**6)))
                    if n not in taken)
        if not (all(lycoris.is_plain_lora(p) for p in modules.values())
                and self._load_adapter(path, key, name, {id(table[m]) for m in modules})):
            # IA3, GLoRA and OFT deltas depend on the layer's weight: its own, not one with
            # the LoRAs of the last batch fused or merged into it
            self._unfuse()
            self._state.merged.restore()
            self._state.deltas[name] = lycoris.load_deltas(key, modules, table)
        self.adapters[key] = name
        return name

    def _load_adapter(self, path: Path, key: Path, name: str, layers: set[int]) -> bool:
        """Load a plain LoRA as a peft adapter; False (and nothing loaded) when diffusers
        leaves some of its layers out, as it does for some module names."""
        shapes, _ = _shapes_and_metadata(key)
        kwargs = {}
        sgm = any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))
                  for k in shapes)
        if sgm and getattr(self.pipe, "text_encoder_2", None) is None:
            kwargs["unet_config"] = self.pipe.unet.config  # SDXL pipelines pass it themselves
        source = str(key) if key.suffix.lower() == ".safetensors" else _load_pickled(key)
        self._state.active = None  # loading may change which adapters are active
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter is a second one
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                self.pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except Exception as e:
            from sdbatch.models.stack import is_out_of_memory

            if is_out_of_memory(e):  # the batch's to retry smaller, not another way to load
                self._drop_adapter(name)
                raise
            placed = None  # diffusers' kohya reader guesses from key names; the check passed
        else:
            placed = {id(layer.get_base_layer()) for layer in self._lora_layers()
                      if name in layer.lora_A}
        if placed != layers:
            self._drop_adapter(name)
            return False
        return True

    def _drop_adapter(self, name: str) -> None:
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters(name)

    def apply(self, loras: Iterable[tuple[Path, Weight]], fuse: bool = False) -> None:
        """Make exactly these LoRAs active with these weights; an empty set disables LoRA.

        A weight is one number for the whole LoRA, or (text encoder, UNet) to set the parts
        apart as the WebUI's <lora:name:te:unet> does: the text encoders' layers (both of
        SDXL) take the first, the UNet's the second, each part alone. Weights of a file named
        twice add up, part by part (the WebUI applies it twice); a LoRA at 0 for both parts
        is left out, so it costs nothing and gives the image without that LoRA. With
        ``fuse`` the LoRAs' deltas are added into the layers' own weights, which then run
        alone (no extra LoRA matmuls a call) until the set or a weight changes: then every
        fused layer gets its own weight back exactly (a copy, not a subtraction, so an image
        never depends on which batches ran before it) and the new set is fused. Files
        loaded as deltas (lycoris.py) are merged that way always, fuse or not.
        """
        weights: dict[str, tuple[float, float]] = {}
        for path, weight in loras:
            name = self.load(path)
            te, unet = part_weights(weight)
            was_te, was_unet = weights.get(name, (0.0, 0.0))
            weights[name] = (was_te + te, was_unet + unet)
        for name in weights:
            self._state.used[name] = None
            self._state.used.move_to_end(name)
        self._evict(set(weights))
        deltas = self._state.deltas
        active = {n: w for n, w in weights.items() if w != (0.0, 0.0) and n not in deltas}
        merged = {deltas[n]: w for n, w in weights.items() if w != (0.0, 0.0) and n in deltas}
        if fuse and active == self._state.fused and merged == self._state.merged.current:
            return
        self._unfuse()  # first: a fused layer's saved weight holds the deltas merged now
        self._state.merged.set(merged)
        self._activate(active)
        if fuse and active:
            self._fuse(active)

    def _evict(self, in_use: set[str]) -> None:
        """Unload the least recently used networks beyond KEEP_UNUSED; they load again if
        asked for (the same file, the same deltas: an image never depends on it)."""
        unused = [n for n in self._state.used if n not in in_use]
        for name in unused[:max(0, len(unused) - KEEP_UNUSED)]:
            del self._state.used[name]
            path = next(p for p, n in self.adapters.items() if n == name)
            del self.adapters[path]
            if self._state.deltas.pop(name, None) is None:
                self.pipe.delete_adapters(name)

    def _lora_layers(self) -> Iterator[torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        for attr in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, attr, None)
            if model is not None:
                yield from (m for m in model.modules() if isinstance(m, LoraLayer))

    @torch.no_grad()
    def _fuse(self, active: dict[str, tuple[float, float]]) -> None:
        """Add the active adapters' deltas (at the weights set_adapters gave them) into
        their layers' weights, then switch the adapters off: the layers run alone."""
        for layer in self._lora_layers():
            names = [a for a in layer.active_adapters if a in layer.lora_A]
            if not names:
                continue
            weight = layer.get_base_layer().weight
            self._state.saved[layer] = weight.detach().to("cpu", copy=True)
            delta = sum(layer.get_delta_weight(a).float() for a in names)
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.pipe.disable_lora()
        self._state.active = {}
        self._state.fused = active

    @torch.no_grad()
    def _unfuse(self) -> None:
        for layer, weight in self._state.saved.items():
            layer.get_base_layer().weight.copy_(weight)
        self._state.saved.clear()
        self._state.fused = None

    def _component_weights(self, active: dict[str, tuple[float, float]]) -> list[dict]:
        """set_adapters' per-component weights: each adapter's (te, unet) given to each
        model that holds a part of it (naming a model that holds none makes diffusers
        warn; one left out would get weight 1)."""
        held = self.pipe.get_list_adapters()  # {"unet": [...], "text_encoder": [...]}
        return [{model: unet if model == "unet" else te
                 for model, names in held.items() if name in names}
                for name, (te, unet) in active.items()]

    def _activate(self, active: dict[str, tuple[float, float]]) -> None:
        if active == self._state.active:
            return
        if not active:
            if set(self.adapters.values()) - set(self._state.deltas):
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(active), adapter_weights=self._component_weights(active))
        self._state.active = active


# ---- writing (tests, the embedded tiny family) ----------------------------------------------

def _targets(model: torch.nn.Module, scopes: tuple[str, ...]
             ) -> Iterator[tuple[str, torch.nn.Module]]:
    """What kohya's default LoRA trains: Linear and 1x1 conv layers of attention/MLP blocks."""
    for name, module in _base_modules(model):
        if not any(s in name for s in scopes):
            continue
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            continue
        yield name, module


def write_kohya_lora(path: Path, unet, text_encoder, rank: int = 4, seed: int = 0,
                     scale: float = 1.0, *, text_encoder_2=None, alpha: float | None = None,
                     name: str | None = None) -> Path:
    """Write a deterministic random-weight kohya LoRA for these models; return the path.

    The same arguments give the same bytes. scale sets how far the LoRA moves each layer
    (its delta is about scale times a layer's own weight scale at weight 1). With
    text_encoder_2 it is an SDXL LoRA: lora_te1_/lora_te2_ and sgm-layout UNet names, as
    kohya's sd-scripts writes them. Either model may be None to leave its part out.
    """
    path = Path(path)
    gen = torch.Generator("cpu").manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    parts: list[tuple[str, torch.nn.Module]] = []
    if unet is not None:
        for mod_name, module in _targets(unet, ("attentions.",)):
            if text_encoder_2 is not None:
                mod_name = _sgm_name(mod_name, unet) or mod_name
            parts.append((_kohya("lora_unet_", mod_name), module))
    te_prefixes = ("lora_te1_", "lora_te2_") if text_encoder_2 is not None else ("lora_te_",)
    for prefix, encoder in zip(te_prefixes, (text_encoder, text_encoder_2), strict=False):
        if encoder is None:
            continue
        for mod_name, module in _targets(encoder, ("self_attn.", "mlp.")):
            if not mod_name.startswith("text_model."):
                mod_name = "text_model." + mod_name
            parts.append((_kohya(prefix, mod_name), module))
    tensors: dict[str, torch.Tensor] = {}
    for key, module in sorted(parts, key=lambda p: p[0]):
        out_f, in_f = module.weight.shape[:2]
        conv = (1, 1) if module.weight.ndim == 4 else ()
        down = torch.randn((rank, in_f, *conv), generator=gen) / math.sqrt(in_f)
        up = torch.randn((out_f, rank, *conv), generator=gen) * (scale / math.sqrt(rank))
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if not tensors:
        raise ValueError("write_kohya_lora: no Linear/Conv2d layer to adapt in the given models")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": f"{alpha:g}", "ss_output_name": name or path.stem}
    tensors = dict(sorted(tensors.items()))  # the data order the safetensors library uses
    data = b"".join(t.numpy().tobytes() for t in tensors.values())
    metadata["sshs_model_hash"] = hashlib.sha256(data).hexdigest()  # as kohya does
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_safetensors_bytes(tensors, metadata, data))
    return path


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       data: bytes) -> bytes:
    """A float32 .safetensors file with a sorted header: the safetensors library writes
    metadata in hash-map order, so its bytes differ from run to run."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data

