"""A1111 hypernetworks (.pt), which diffusers does not implement.

A hypernetwork file maps a context width (320, 640, 768, 1024, 1280...; 64 for the tiny
model) to a pair of small MLPs, one for the keys and one for the values. In every UNet
attention whose context (the text for cross-attention, the image features for
self-attention) has that width, the WebUI feeds to_k with x + mlp_k(x) * multiplier and
to_v with x + mlp_v(x) * multiplier. sdbatch does the same with its own attention
processor, attached while a hypernetwork is active and detached otherwise, so a batch
without one runs the pipeline's untouched processors; multipliers change per batch
without reading the file again.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from sdbatch.models import hashing
from sdbatch.models.networks_errors import NetworkError

__all__ = ["Hypernetwork", "HypernetworkAttnProcessor", "Hypernetworks", "NetworkError",
           "hypernetwork_hash", "write_a1111_hypernetwork"]

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}
ACTIVATIONS.update({  # the WebUI accepts every torch activation by its lowercased class name
    name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
    if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"
})


def hypernetwork_hash(path: Path) -> str:
    """The WebUI's short hash of a hypernetwork: the first 10 hex of the file's sha256."""
    return hashing.sha256(Path(path))[:10]


def dropout_structure(layer_structure: list[float], use_dropout: bool,
                      last_layer_dropout: bool) -> list[float]:
    """The WebUI's dropout per layer; dropouts take places in the MLP, so keys depend on it."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    middle = [0.3] * (len(layer_structure) - 3)
    return [0.0, *middle, 0.3 if last_layer_dropout else 0.0, 0.0]


def build_mlp(dim: int, layer_structure: list[float], activation: str | None,
              layer_norm: bool, activate_output: bool, dropouts: list[float]
              ) -> torch.nn.Sequential:
    """The WebUI's HypernetworkModule layers, in its order, so state dict keys line up."""
    layers: list[torch.nn.Module] = []
    last = len(layer_structure) - 2
    for i in range(len(layer_structure) - 1):
        width = int(dim * layer_structure[i + 1])
        layers.append(torch.nn.Linear(int(dim * layer_structure[i]), width))
        if not (activation in (None, "linear") or (i >= last and not activate_output)):
            layers.append(ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(width))
        if dropouts[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropouts[i + 1]))
    return torch.nn.Sequential(*layers)


class Hypernetwork:
    """One loaded file: width -> (key MLP, value MLP), evaluated in float32 like the WebUI."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self._read()
        self.name = str(data.get("name", self.path.stem))
        structure = [float(x) for x in data.get("layer_structure", [1, 2, 1])]
        activation = data.get("activation_func")
        if activation is not None and activation not in ACTIVATIONS:
            raise NetworkError(f"{self.path}: unsupported activation function {activation!r}; "
                               f"the WebUI supports {', '.join(sorted(ACTIVATIONS))}")
        if structure[0] != 1 or structure[-1] != 1:
            raise NetworkError(f"{self.path}: layer_structure {structure} must start and end "
                               "with 1; the file is damaged")
        dropouts = data.get("dropout_structure")
        if dropouts is None:
            dropouts = dropout_structure(structure, bool(data.get("use_dropout", False)),
                                         bool(data.get("last_layer_dropout", False)))
        self.layers: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]] = {}
        for width, pair in data.items():
            if not isinstance(width, int):
                continue
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise NetworkError(f"{self.path}: entry {width} is not a (K, V) pair of "
                                   "modules; the file is damaged or not a hypernetwork")
            mlps = []
            for state in pair:
                mlp = build_mlp(width, structure, activation, bool(data.get("is_layer_norm")),
                                bool(data.get("activate_output", True)), dropouts)
                state = {_OLD_KEYS.get(k, k).removeprefix("linear."): v
                         for k, v in state.items()}
                try:
                    mlp.load_state_dict(state)
                except RuntimeError as e:
                    raise NetworkError(f"{self.path}: its width-{width} modules do not match "
                                       f"its own metadata ({e}); the file is damaged") from e
                mlps.append(mlp.eval().requires_grad_(False))
            self.layers[width] = (mlps[0], mlps[1])
        if not self.layers:
            raise NetworkError(f"{self.path}: holds no hypernetwork modules (no width keys); "
                               "use an A1111 hypernetwork .pt file")

    def _read(self) -> dict:
        if not self.path.is_file():
            raise NetworkError(f"{self.path}: no such hypernetwork file; check the path")
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that needs code to load is refused, by design
            raise NetworkError(f"{self.path}: cannot be read safely as a hypernetwork "
                               f"({type(e).__name__}: {e}); only plain A1111 hypernetwork "
                               ".pt files (dicts, lists, tensors, strings) are read") from e
        if not isinstance(data, dict):
            raise NetworkError(f"{self.path}: holds a {type(data).__name__}, not a hypernetwork")
        return data

    def to(self, device: torch.device) -> Hypernetwork:
        for pair in self.layers.values():
            for mlp in pair:
                mlp.to(device=device, dtype=torch.float32)
        return self


_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


class HypernetworkAttnProcessor:
    """diffusers' AttnProcessor2_0 with the active hypernetworks applied to the context
    before to_k and to_v, chained in order as the WebUI chains several hypernetworks."""

    def __init__(self, active: list[tuple[Hypernetwork, float]]):
        self.active = active  # shared with Hypernetworks, which updates it per batch

    def contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        for net, multiplier in self.active:
            pair = net.layers.get(context.shape[-1])
            if pair is None:
                continue
            k, v = context_k.float(), context_v.float()
            context_k = (k + pair[0](k) * multiplier).to(context.dtype)
            context_v = (v + pair[1](v) * multiplier).to(context.dtype)
        return context_k, context_v

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self.contexts(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1,
                                                              attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_widths(unet) -> set[int]:
    """The context widths the UNet's attentions see (self- and cross-attention)."""
    widths = set()
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")) and hasattr(module, "to_k"):
            to_k = getattr(module.to_k, "base_layer", module.to_k)
            widths.add(int(to_k.in_features))
    return widths


class _PipeHypernetworks:
    def __init__(self):
        self.loaded: dict[Path, Hypernetwork] = {}
        self.active: list[tuple[Hypernetwork, float]] = []
        self.saved: dict | None = None  # the UNet's own processors while ours are attached


_per_pipe: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KEEP_UNUSED = 4  # files kept loaded beyond those in use (as for LoRAs)


class Hypernetworks:
    """The hypernetworks of one loaded pipeline: each file read once, multipliers per batch.

    Every Hypernetworks of the same pipeline shares one state, so the UNet's own attention
    processors are saved once and always restored.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        state = _per_pipe.setdefault(pipe, _PipeHypernetworks())
        self.loaded, self.active, self._state = state.loaded, state.active, state

    def load(self, path: Path) -> Hypernetwork:
        """Read and check a file (once)."""
        key = Path(path).resolve()
        if key not in self.loaded:
            net = Hypernetwork(path)
            widths = attention_widths(self.pipe.unet)
            if not widths.intersection(net.layers):
                raise NetworkError(
                    f"{path}: made for context widths {sorted(net.layers)} but this "
                    f"checkpoint's attentions see widths {sorted(widths)}, so it would change "
                    "nothing; use a hypernetwork trained for this checkpoint's family")
            self.loaded[key] = net.to(self.pipe.unet.device)
        self.loaded[key] = self.loaded.pop(key)  # the most recently used last
        return self.loaded[key]

    def apply(self, entries: Iterable[tuple[Path, float]]) -> None:
        """Make exactly these hypernetworks active, in order; none (or all at 0) detaches."""
        entries = list(entries)
        active = [(self.load(path), float(m)) for path, m in entries]
        self.active[:] = [(net, m) for net, m in active if m != 0.0]
        in_use = {Path(path).resolve() for path, _ in entries}
        for key in [k for k in self.loaded if k not in in_use][:-KEEP_UNUSED or None]:
            del self.loaded[key]  # the least recently used go: an axis over many files
        if self.active:
            self.attach()
        else:
            self.detach()

    def attach(self) -> None:
        if self._state.saved is not None:
            return
        unet = self.pipe.unet
        saved = unet.attn_processors
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        custom = {type(p).__name__ for p in saved.values()
                  if not isinstance(p, (AttnProcessor, AttnProcessor2_0))}
        if custom:
            raise NetworkError(f"hypernetworks need diffusers' default attention processors; "
                               f"this UNet uses {', '.join(sorted(custom))}: render "
                               "hypernetworks without that feature")
        unet.set_attn_processor(HypernetworkAttnProcessor(self.active))
        self._state.saved = saved

    def detach(self) -> None:
        if self._state.saved is not None:
            self.pipe.unet.set_attn_processor(self._state.saved)
            self._state.saved = None


def write_a1111_hypernetwork(path: Path, dim: int | Iterable[int],
                             layer_structure: Iterable[float] = (1, 2, 1), seed: int = 0, *,
                             activation_func: str | None = "relu", is_layer_norm: bool = False,
                             use_dropout: bool = False, scale: float = 1.0,
                             name: str | None = None) -> Path:
    """Write a deterministic random-weight hypernetwork as the WebUI saves one.

    dim: the context width(s) it acts on. Weights are drawn with std scale/sqrt(fan_in), so
    at multiplier 1 it visibly changes an image (the WebUI's own init starts near zero).
    """
    path = Path(path)
    structure = [float(x) for x in layer_structure]
    dims = [dim] if isinstance(dim, int) else list(dim)
    gen = torch.Generator("cpu").manual_seed(seed)
    dropouts = dropout_structure(structure, use_dropout, False)
    data: dict = {}
    for width in dims:
        pair = []
        for _ in range(2):
            mlp = build_mlp(width, structure, activation_func, is_layer_norm, False, dropouts)
            state = {}
            for key, value in mlp.state_dict().items():
                if isinstance(mlp.get_submodule(key.rsplit(".", 1)[0]), torch.nn.LayerNorm):
                    state[f"linear.{key}"] = value.clone()
                    continue
                fan_in = value.shape[-1] if value.ndim == 2 else value.shape[0]
                std = scale / math.sqrt(fan_in) if value.ndim == 2 else 0.01 * scale
                state[f"linear.{key}"] = torch.randn(value.shape, generator=gen) * std
            pair.append(state)
        data[width] = pair
    data.update({
        "step": 0, "name": name or path.stem, "layer_structure": structure,
        "activation_func": activation_func, "is_layer_norm": is_layer_norm,
        "weight_initialization": "Normal", "sd_checkpoint": None, "sd_checkpoint_name": None,
        "activate_output": False, "use_dropout": use_dropout, "dropout_structure": dropouts,
        "last_layer_dropout": False, "optional_info": None,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path
