"""Image model files (upscalers, face restorers) through spandrel, read the safe way.

Spandrel tells the architecture (ESRGAN, Real-ESRGAN's Compact, SwinIR, HAT, DAT, GFPGAN,
CodeFormer, ... and spandrel_extra_arches' where installed) from the weights alone, so
one loader serves every such file. A .safetensors file cannot run code; a pickled
.pth/.pt goes through the same weights-only rule and ``model.allow_pickle`` opt-in as a
checkpoint (single_file.load_pickled).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

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
    """What the file holds (a state dict, perhaps wrapped as params_ema / state_dict: spandrel
    unwraps those), without running code unless allow_pickle is set."""
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
    from spandrel import UnsupportedModelError

    weights = read_weights(path, allow_pickle)
    try:
        return _loader().load_from_state_dict(weights).eval()
    except UnsupportedModelError:
        raise ModelFileError(
            f"{path}: spandrel does not recognise this model's architecture (it reads "
            "ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, GFPGAN, CodeFormer and more; some need "
            "the spandrel-extra-arches package installed)") from None
