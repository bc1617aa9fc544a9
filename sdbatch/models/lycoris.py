"""LyCORIS and DoRA network files (LoCon with a CP middle, LoHa, LoKr, IA3, full, norm,
GLoRA, OFT and BOFT), applied as the WebUI's built-in Lora extension applies them: as a
change of each named layer's weight.

A module's format is told from its keys in the WebUI's order (lora_up/lora_down, hada_,
IA3 ``weight``, lokr_, ``diff``, w_norm/b_norm, GLoRA's a1/a2/b1/b2, oft_blocks/oft_diag).
Its delta at weight 1 is computed once on the CPU; a batch adds the weighted sum of its
networks' deltas into the layers and copies the saved weights back when the set changes,
so a weight sweep never reloads a model and weight 0 is the model's own weights bit for bit.

Why deltas and not peft's LoHa / LoKr / IA3 / DoRA adapters: diffusers' set_adapters, which
sets per-batch weights, drives LoRA layers only, and peft nests tuners of other types on
diffusers' LoRA layers only through PeftMixedModel; peft's IA3 has no weight at all; peft's
DoRA normalises per output row with the scale inside the norm, the WebUI per input column
with the weight outside it; peft's LoKr scales unfactorised files by alpha/r, the WebUI by 1.
The maths peft does have (Hadamard and Kronecker products, CP rebuilds) is peft's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdbatch.models.networks_errors import NetworkError

KINDS = {  # format -> the parts of a module key it may hold
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "ia3": {"weight", "on_input"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
             "lokr_t2"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight"},
    "oft": {"oft_blocks", "oft_diag", "rescale"},
}
COMMON = {"alpha", "scale", "dora_scale"}
NAMES = {"lora": "LoRA/LoCon", "loha": "LoHa", "ia3": "IA3", "lokr": "LoKr", "full": "full",
         "norm": "norm", "glora": "GLoRA", "oft": "OFT/BOFT"}


def module_kind(parts) -> str | None:
    """The module's format from its key parts, in the order the WebUI tries them; None when
    no format matches or a part belongs to none of the matched format's keys."""
    parts = set(parts)
    kind = None
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        kind = "lora"
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        kind = "loha"
    elif "weight" in parts:
        kind = "ia3"
    elif (("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts)
          and ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts)):
        kind = "lokr"
    elif "diff" in parts:
        kind = "full"
    elif {"w_norm", "b_norm"} <= parts:
        kind = "norm"
    elif KINDS["glora"] | {"alpha"} <= parts:
        kind = "glora"
    elif "oft_blocks" in parts or "oft_diag" in parts:
        kind = "oft"
    if kind is None or parts - KINDS[kind] - COMMON:
        return None
    return kind


def is_plain_lora(parts) -> bool:
    """What diffusers loads as a peft LoRA adapter exactly as the WebUI applies it."""
    return set(parts) <= {"lora_up.weight", "lora_down.weight", "alpha"} and \
        module_kind(parts) == "lora"


def _flat(shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def delta_shape(kind: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of the weight a module's tensors build (reshaped to the layer's when the
    sizes match, as the WebUI does)."""
    s = shapes.get
    if kind == "lora":
        up, down = _flat(s("lora_up.weight")), s("lora_down.weight")
        if "lora_mid.weight" in shapes:
            return (up[0], down[1], *s("lora_mid.weight")[2:])
        return (up[0], *down[1:])
    if kind == "loha":
        a, b = s("hada_w1_a"), s("hada_w1_b")
        if "hada_t1" in shapes:
            return (a[1], b[1], *s("hada_t1")[2:])
        return (a[0], *b[1:])
    if kind == "lokr":
        w1 = s("lokr_w1") or (s("lokr_w1_a")[0], s("lokr_w1_b")[1])
        if "lokr_w2" in shapes:
            w2 = s("lokr_w2")
        elif "lokr_t2" in shapes:
            w2 = (s("lokr_w2_a")[1], s("lokr_w2_b")[1], *s("lokr_t2")[2:])
        else:
            w2 = (s("lokr_w2_a")[0], s("lokr_w2_b")[1])
        return (w1[0] * w2[0], w1[1] * math.prod(w2[1:]))
    if kind == "full":
        return s("diff")
    if kind == "norm":
        return s("w_norm")
    if kind == "glora":
        return (s("b2.weight")[0], s("b1.weight")[1])
    if kind == "oft":  # the rotation blocks: the layer's shape is its own
        return s("oft_blocks") or s("oft_diag")
    return s("weight")  # ia3: one factor per output (or input) channel


def fits(kind: str, shapes: dict[str, tuple[int, ...]], weight: torch.Tensor,
         bias: torch.Tensor | None) -> bool:
    """Whether a module's tensors make a delta this layer can take."""
    shape = delta_shape(kind, shapes)
    if kind == "glora" and not _glora_fits(shapes, weight):
        return False
    if kind == "oft":
        if not _oft_fits(shapes, weight):
            return False
        shape = tuple(weight.shape)
    if kind == "ia3":
        return len(shape) == 1 and weight.ndim >= 2 and shape[0] in weight.shape[:2]
    if kind == "norm" and bias is None:
        return False
    if math.prod(shape) != weight.numel():
        return False
    bias_shape = shapes.get("diff_b") or shapes.get("b_norm")
    if bias_shape is not None and (bias is None or math.prod(bias_shape) != bias.numel()):
        return False
    dora = shapes.get("dora_scale")
    return dora is None or math.prod(dora) in weight.shape[:2]


def _glora_fits(shapes: dict[str, tuple[int, ...]], weight: torch.Tensor) -> bool:
    """GLoRA is b2 b1 + W a2 a1: a Linear's weight only (the WebUI's product fails on a
    convolution's)."""
    if weight.ndim != 2:
        return False
    out, inner = weight.shape
    a1, a2, b1, b2 = (shapes[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    return (a2[0] == inner and a1[1] == inner and a2[1] == a1[0] and b2[0] == out
            and b1[1] == inner and b2[1] == b1[0])


def _oft_fits(shapes: dict[str, tuple[int, ...]], weight: torch.Tensor) -> bool:
    """Whether the rotation blocks tile the layer's output channels: (blocks, size, size) for
    OFT, (stages, blocks, size, size) for BOFT, whose butterfly stage i pairs rows
    2^i x size / 2 apart."""
    out = weight.shape[0]
    blocks = shapes.get("oft_blocks") or shapes["oft_diag"]
    if weight.ndim < 2 or blocks[-1] != blocks[-2] or blocks[-3] * blocks[-1] != out:
        return False
    rescale = shapes.get("rescale")
    if rescale is not None and math.prod(rescale) != out:
        return False
    if len(blocks) == 4 and "oft_blocks" in shapes:
        size = blocks[-1]
        return size % 2 == 0 and out % (2 ** (blocks[0] - 1) * size) == 0
    return len(blocks) == 3


def _scale(t: dict[str, torch.Tensor], dim: int | None) -> float:
    """The WebUI's calc_scale: a stored scale, else alpha / rank where the format has a rank."""
    if "scale" in t:
        return float(t["scale"])
    if dim is not None and "alpha" in t:
        return float(t["alpha"]) / dim
    return 1.0


def _updown(kind: str, t: dict[str, torch.Tensor], weight: torch.Tensor
            ) -> tuple[torch.Tensor, int | None]:
    """A module's unscaled weight change and the rank its alpha divides by."""
    if kind == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        if "lora_mid.weight" in t:
            return torch.einsum("n m k l, i n, m j -> i j k l", t["lora_mid.weight"], up2,
                                down2), down.shape[0]
        return up2 @ down2, down.shape[0]
    if kind == "loha":
        from peft.tuners.loha.layer import make_weight, make_weight_cp

        one = torch.tensor(1.0)
        w1a, w1b, w2a, w2b = (t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if "hada_t1" in t and "hada_t2" in t:
            return make_weight_cp(t["hada_t1"], w1a, w1b, t["hada_t2"], w2a, w2b, one), \
                w1b.shape[0]
        return make_weight(w1a.reshape(w1a.shape[0], -1), w1b.reshape(w1b.shape[0], -1),
                           w2a.reshape(w2a.shape[0], -1), w2b.reshape(w2b.shape[0], -1),
                           one), w1b.shape[0]
    if kind == "lokr":
        from peft.tuners.lokr.layer import make_kron, make_weight_cp

        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = make_weight_cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if "lokr_w2_b" in t:
            dim = t["lokr_w2_b"].shape[0]
        return make_kron(w1, w2), dim
    if kind == "ia3":
        w = t["weight"]
        on_input = "on_input" in t and bool(t["on_input"])
        shape = [1] * weight.ndim
        shape[1 if on_input else 0] = -1
        return weight * w.reshape(shape), None
    if kind == "glora":
        return t["b2.weight"] @ t["b1.weight"] + (weight @ t["a2.weight"]) @ t["a1.weight"], None
    if kind == "oft":
        return oft_weight(t, weight) - weight, None
    return t["diff" if kind == "full" else "w_norm"], None


def oft_weight(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The layer's weight turned as the WebUI's OFT module turns it. Its output rows, in
    blocks, are multiplied by orthogonal matrices: the Cayley transform (I + Q)(I - Q)^-1 of
    the skew part Q of ``oft_blocks`` (Q's norm capped at alpha x out channels where alpha
    is given), or an old LyCORIS file's ``oft_diag`` as stored. OFT turns each block of
    rows by its matrix's transpose; BOFT's stages (4-D blocks) each shuffle the rows into
    butterfly pairs, turn the blocks, and shuffle back. ``rescale`` scales the rows."""
    out = weight.shape[0]
    if "oft_blocks" in t:
        blocks = t["oft_blocks"]
        q = blocks - blocks.transpose(-1, -2)
        cap = float(t["alpha"]) * out if "alpha" in t else 0.0
        if cap != 0:
            norm = q.flatten().norm()
            q = q * ((norm.clamp(max=cap) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(blocks.shape[-1])
        turns = (eye + q) @ torch.linalg.inv(eye - q)
    else:
        turns = t["oft_diag"]
    rows = weight.reshape(out, -1)
    cols = rows.shape[1]
    size = turns.shape[-1]
    if turns.ndim == 3:
        turned = torch.einsum("knm,knx->kmx", turns, rows.reshape(-1, size, cols))
    else:
        turned = rows
        for i, stage in enumerate(turns):
            apart = 2 ** i * size // 2
            turned = turned.reshape(-1, 2, apart, cols).transpose(1, 2)
            turned = torch.einsum("kij,kjx->kix", stage, turned.reshape(-1, size, cols))
            turned = turned.reshape(-1, apart, 2, cols).transpose(1, 2)
    turned = turned.reshape(out, cols)
    if "rescale" in t:
        turned = t["rescale"].reshape(out, 1) * turned
    return turned.reshape(weight.shape)


def weight_decompose(updown: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor
                     ) -> torch.Tensor:
    """DoRA as the WebUI finalises it: the merged weight's direction, each column (input
    channel) rescaled to dora_scale, less the weight. A dora_scale with one value per output
    row (LyCORIS's wd_on_out) normalises rows instead, as LyCORIS trains it; the WebUI
    normalises columns only, which for such a file is not what was trained."""
    merged = weight + updown
    out, rest = merged.shape[0], [1] * (merged.ndim - 1)
    per_output = out != merged.shape[1] and dora_scale.numel() == out or (
        dora_scale.ndim >= 2 and dora_scale.shape[0] == out != 1)
    if per_output:
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *rest)
        return merged * (dora_scale.reshape(out, *rest) / norm) - weight
    cols = merged.shape[1]
    norm = merged.transpose(0, 1).reshape(cols, -1).norm(dim=1)
    shape = [1, cols, *rest[1:]]
    return merged * (dora_scale.reshape(shape) / norm.reshape(shape)) - weight


def module_delta(t: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight delta, bias delta) of one module at weight 1, in float32 on the CPU, the
    WebUI's finalize_updown: the format's change times its scale, then DoRA's decomposition.
    A delta at weight m is m times this."""
    t = {k: v.float() for k, v in t.items()}
    weight = weight.detach().float().cpu()
    kind = module_kind(t)
    updown, dim = _updown(kind, t, weight)
    updown = updown.reshape(weight.shape) * (1.0 if kind == "oft" else _scale(t, dim))
    if "dora_scale" in t:
        updown = weight_decompose(updown, weight, t["dora_scale"])
    ex_bias = t.get("diff_b", t.get("b_norm"))
    if ex_bias is not None and bias is not None:
        ex_bias = ex_bias.reshape(bias.shape)
    return updown, ex_bias


# ---- applying ------------------------------------------------------------------------------

@dataclass(eq=False)
class DeltaNetwork:
    """A network file's per-module deltas at weight 1, on the CPU."""

    path: Path
    modules: list[tuple[torch.nn.Module, bool, torch.Tensor, torch.Tensor | None]]
    # (layer, whether it is in a text encoder, weight delta, bias delta)


def load_deltas(path: Path, modules: dict[str, dict], table: dict[str, torch.nn.Module]
                ) -> DeltaNetwork:
    """Read a checked file's tensors and compute each module's delta against its layer."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        parts.setdefault(name, {})[part] = tensor
    out = []
    with torch.no_grad():
        for name in sorted(modules):
            layer = table[name]
            bias = getattr(layer, "bias", None)
            dw, db = module_delta(parts[name], layer.weight, bias)
            out.append((layer, name.startswith("lora_te"), dw, db))
    return DeltaNetwork(path, out)


@dataclass
class MergedDeltas:
    """The delta networks merged into a pipeline's weights now, and each touched layer's own
    weight and bias, kept on the CPU to be copied back exactly."""

    current: dict[DeltaNetwork, tuple[float, float]] = field(default_factory=dict)
    saved: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict)

    @torch.no_grad()
    def set(self, weights: dict[DeltaNetwork, tuple[float, float]]) -> None:
        """Merge exactly these networks at these (text encoder, UNet) weights."""
        weights = {n: w for n, w in weights.items() if w != (0.0, 0.0)}
        if weights == self.current:
            return
        self.restore()
        total: dict[torch.nn.Module, list] = {}
        for net, (te, unet) in weights.items():
            for layer, is_te, dw, db in net.modules:
                m = te if is_te else unet
                if m == 0.0:
                    continue
                acc = total.setdefault(layer, [0.0, None])
                acc[0] = acc[0] + m * dw
                if db is not None:
                    acc[1] = m * db if acc[1] is None else acc[1] + m * db
        for layer, (dw, db) in total.items():
            bias = getattr(layer, "bias", None)
            self.saved[layer] = (layer.weight.detach().to("cpu", copy=True),
                                 None if bias is None else bias.detach().to("cpu", copy=True))
            _add(layer.weight, dw)
            if db is not None:
                _add(bias, db)
        self.current = weights

    @torch.no_grad()
    def restore(self) -> None:
        for layer, (weight, bias) in self.saved.items():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        self.saved.clear()
        self.current = {}


def _add(param: torch.Tensor, delta: torch.Tensor) -> None:
    param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


def unplaced_error(path: Path, keys: list[str]) -> NetworkError:
    return NetworkError(
        f"{path}: {len(keys)} key(s) in no layout sdbatch applies (e.g. {', '.join(keys[:4])}); "
        "it reads LoRA, LoCon, LoHa, LoKr, IA3, full-difference, norm, GLoRA, OFT, BOFT and "
        "DoRA files as the WebUI does: use a network of one of those formats")
