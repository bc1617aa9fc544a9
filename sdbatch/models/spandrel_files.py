"""Image model files (upscalers, face restorers) through spandrel, read the safe way.

Spandrel tells the architecture (ESRGAN, Real-ESRGAN's Compact, SwinIR, HAT, DAT, GFPGAN,
CodeFormer, ... and spandrel_extra_arches' where installed) from the weights alone, so
one loader serves every such file. A .safetensors file cannot run code; a pickled
.pth/.pt goes through the same weights-only rule and ``model.allow_pickle`` opt-in as a
checkpoint (single_file.load_pickled).
"""

from __future__ import annotations

import gc
import os
from functools import cache
from pathlib import Path

import torch

from sdbatch.models.single_file import ModelFileError, _load_safetensors, load_pickled

SUFFIXES = (".safetensors", ".pth", ".pt")


@cache
def _loader():
    """spandrel's loader over its registry, with the extra architectures (non-commercial
    licences, a separate package) added once when they are installed."""
    import spandrel

    try:
        import spandrel_extra_arches
    except ImportError:
        pass
    else:
        spandrel_extra_arches.install(ignore_duplicates=True)
    return spandrel.ModelLoader()


def read_weights(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """What the file holds (a state dict, perhaps wrapped as params_ema / state_dict, which
    spandrel's canonicalize_state_dict unwraps), without running code unless allow_pickle
    is set."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such model file: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise ModelFileError(f"{path}: unknown model file type {path.suffix!r}; image models "
                             f"are read from {', '.join(SUFFIXES)} files")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    data = load_pickled(path, allow_pickle)
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    return data


def load(path: str | os.PathLike, allow_pickle: bool = False):
    """The spandrel model descriptor of a file (on the CPU in float32, in eval mode): call it
    on a (1, C, H, W) tensor in 0..1; .scale, .architecture, .purpose say what it is."""
    from spandrel import UnsupportedModelError, canonicalize_state_dict

    weights = canonicalize_state_dict(read_weights(path, allow_pickle))
    try:
        return _loader().load_from_state_dict(weights).eval()
    except UnsupportedModelError:
        raise ModelFileError(
            f"{path}: spandrel does not recognise this model's architecture (it reads "
            "ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, GFPGAN, CodeFormer and more; some need "
            "the spandrel-extra-arches package installed)") from None
    except Exception as e:  # noqa: BLE001 - an architecture's own checks fail many ways
        raise ModelFileError(f"{path}: spandrel cannot read it ({type(e).__name__}: {e}); "
                             "is the file complete? download it again") from None


class Loaded:
    """A run's spandrel models (of one worker): each file loaded on first use and kept on
    ``device`` until release(), in ``dtype`` where its architecture supports it (float32
    otherwise)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False):
        self.device, self.dtype, self.allow_pickle = device, dtype, allow_pickle
        self._models: dict[Path, object] = {}

    def get(self, path: Path):
        if path not in self._models:
            model = load(path, self.allow_pickle)
            dtype = self.dtype
            if (dtype == torch.float16 and not model.supports_half) or \
                    (dtype == torch.bfloat16 and not model.supports_bfloat16):
                dtype = torch.float32
            self._models[path] = model.to(self.device, dtype)
        return self._models[path]

    def release(self) -> None:
        if not self._models:
            return
        self._models.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
