"""Single-file checkpoints (.safetensors, .ckpt) -> a diffusers pipeline, with no network.

The file is read safely (a pickle is only unpickled on explicit opt-in), the family is told
from its keys, and each model is built by diffusers' single-file conversion from the
family's shipped config folder (diffusers would otherwise download those configs), from
its own tensors only, read just before it is built.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from sdbatch.models import families, safetensors_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class ModelFileError(ValueError):
    """A model file that cannot be used as it is; the message names the file and the fix."""


def _corrupt(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path} is corrupt or truncated ({detail}); download it again "
                          "(an interrupted download leaves a short file)")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(f"no such model file: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise ModelFileError(f"{path}: unknown model file type {path.suffix!r}; sdbatch reads "
                             f"{', '.join(SUFFIXES)} files and diffusers folders")


def _tensors_only(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint: inside any "state_dict" nesting, tensors only."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise ModelFileError(f"{path} holds no weights (no tensors found)")
    return sd


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _corrupt(path, f"safetensors: {e}") from None


def load_pickled(path: Path, allow_pickle: bool) -> Any:
    """What a pickled torch file holds, read with torch's weights-only unpickler; a file
    that needs more (it would run code from the file) is refused unless allow_pickle is set
    (the job's ``model.allow_pickle``, which covers every model file the job names)."""
    mmap = zipfile.is_zipfile(path)  # torch maps zip checkpoints instead of copying them
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not needed:
            raise _corrupt(path, "not a readable torch checkpoint") from None
        if not allow_pickle:
            raise ModelFileError(
                f"{path} is a pickle that needs {needed.group(1)} to load, beyond plain "
                "weights. Unpickling it runs code stored in the file, which can do anything "
                "(arbitrary code execution). Prefer a .safetensors version of this model; "
                "if you trust its source, set `model.allow_pickle: true` in the job to load "
                "it anyway.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _corrupt(path, f"torch: {str(e).splitlines()[0] or type(e).__name__}") from None
    try:  # explicitly allowed above: the user trusts this file
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise _corrupt(path, f"torch: {str(e).splitlines()[0] or type(e).__name__}") from None


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    return _tensors_only(load_pickled(path, allow_pickle), path)


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False
                    ) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, read the safe way.

    .safetensors cannot run code; .ckpt/.pt/.pth/.bin are read with torch's weights-only
    unpickler, and a file that needs more is refused unless allow_pickle is set.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    return _load_pickle(path, allow_pickle)


def read_shapes(path: str | os.PathLike, allow_pickle: bool = False
                ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint; a .safetensors header is read without its weights."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(path, allow_pickle).items()}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise _corrupt(path, f"safetensors: {e}") from None


# early SD1 files name the CLIP text model's parts without text_model.; the WebUI renames them
OLD_SD1_TEXT = "cond_stage_model.transformer."
OLD_SD1_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def old_sd1_text_key(key: str) -> str:
    """A text encoder key in today's layout (the WebUI's checkpoint_dict_replacements_sd1)."""
    if key.startswith(OLD_SD1_TEXT) and key[len(OLD_SD1_TEXT):].startswith(OLD_SD1_TEXT_PARTS):
        return f"{OLD_SD1_TEXT}text_model.{key[len(OLD_SD1_TEXT):]}"
    return key


# LDM key prefixes of each model a pipeline is built from; others take the whole file
PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.", "vae."),
            "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
            "text_encoder_2": ("conditioner.embedders.1.",)}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
STAGING_BYTES = 16 << 20  # the slice a tensor is read in before its cast


class Checkpoint:
    """A checkpoint's tensors, handed out one model at a time and cast to the load dtype as
    they are read, so loading costs the loaded weights, not the weights plus the file.

    A .safetensors file is read tensor by tensor with plain reads: mapping it (safe_open)
    would count the whole file in the process's memory until it is closed. A pickle is
    unpickled whole (a zip checkpoint is mapped); each model's tensors leave it as taken.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype,
                 allow_pickle: bool = False):
        self.path, self.dtype = Path(path), dtype
        _check_file(self.path)
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors":
            self._layout = _safetensors_layout(self.path)
            self.shapes = {k: tuple(v["shape"]) for k, v in self._layout.items()}
        else:
            self._tensors = _load_pickle(self.path, allow_pickle)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def take(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of model ``name`` (by its LDM prefixes), read now and not kept here."""
        keys = [k for k in self.shapes if k.startswith(PREFIXES.get(name, ("",)))]
        if name in PREFIXES:
            self.shapes = {k: v for k, v in self.shapes.items() if k not in set(keys)}
        if self._tensors is not None:
            take = self._tensors.pop if name in PREFIXES else self._tensors.__getitem__
            out = {k: self._cast(take(k)) for k in keys}
        else:
            out = {}
            staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
            with open(self.path, "rb", buffering=0) as f:
                for k in keys:
                    out[k] = self._read(f, k, staging)
        return {old_sd1_text_key(k): v for k, v in out.items()} if name == "text_encoder" \
            else out

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def _read(self, f, key: str, staging: torch.Tensor) -> torch.Tensor:
        """One tensor, read through the staging buffer in slices and cast into its final
        place: a load touches fresh memory for the loaded weights only (first touches are
        what a load costs most, several times more with two loads at once)."""
        entry = self._layout[key]
        if entry["dtype"] not in SAFETENSORS_DTYPES:  # rare types: safetensors' own reader
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as st:
                return self._cast(st.get_tensor(key))
        stored = SAFETENSORS_DTYPES[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=self.dtype if stored.is_floating_point
                          else stored)
        flat = out.reshape(-1)
        per_slice = len(staging) // stored.itemsize
        f.seek(entry["offsets"][0])
        for first in range(0, flat.numel(), per_slice):
            n = min(per_slice, flat.numel() - first)
            chunk = staging[:n * stored.itemsize]
            if f.readinto(chunk.numpy()) != len(chunk):
                raise _corrupt(self.path, f"tensor {key} is cut short")
            flat[first:first + n].copy_(chunk.view(stored))
        return out


def _safetensors_layout(path: Path) -> dict[str, dict[str, Any]]:
    """Key -> dtype, shape and absolute byte offsets, from a header that safetensors checked."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # validates the header against the file
            pass
    except SafetensorError as e:
        raise _corrupt(path, f"safetensors: {e}") from None
    header, start = safetensors_header.read(path)
    header.pop("__metadata__", None)
    return {k: {"dtype": v["dtype"], "shape": v["shape"],
                "offsets": (start + v["data_offsets"][0], start + v["data_offsets"][1])}
            for k, v in header.items()}


def _check_loaded(model, name: str, path: Path, family: str) -> None:
    """Weights missing from the file would stay empty (meta) and fail later, obscurely."""
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ModelFileError(f"{path} has no weights for {len(empty)} parameters of its {name} "
                             f"(e.g. {empty[0]}) under family {family}; is the file complete "
                             "and is model.family right?")


def _component(name: str, library: str, class_name: str, checkpoint: Checkpoint, config: Path,
               family: str, dtype: torch.dtype, path: Path):
    import diffusers
    import transformers

    if name.startswith("tokenizer"):
        folder = config / name
        if not (folder / "tokenizer_config.json").exists():
            folder = families.tokenizer_folder(family, name)
        return getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)
    if name == "scheduler":
        return getattr(diffusers, class_name).from_pretrained(config, subfolder=name,
                                                              local_files_only=True)
    sd = checkpoint.take(name)  # only this model's tensors, freed when it is built
    try:
        if library == "transformers":
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            model = create_diffusers_clip_model_from_ldm(
                getattr(transformers, class_name), sd, subfolder=name, config=str(config),
                torch_dtype=dtype, local_files_only=True)
        else:
            model = getattr(diffusers, class_name).from_single_file(
                sd, config=str(config), subfolder=name, local_files_only=True, dtype=dtype)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(f"{path}: its {name} weights do not fit the {family} config "
                             f"({str(e).splitlines()[0]}); set model.family to the model's "
                             "family") from e
    finally:
        del sd
    _check_loaded(model, name, path, family)
    return model


def import_model_classes() -> None:
    """Import the classes the shipped families' configs and the samplers name: diffusers and
    transformers import them on first use (seconds), which a worker started early does
    before its first load instead of in it."""
    import diffusers
    import diffusers.loaders.single_file_utils  # noqa: F401 - from_single_file converts with it
    import transformers

    from sdbatch import samplers
    from sdbatch.models import tokenizer  # noqa: F401 - the shipped tokenizers' vocabulary
    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    libraries = {"diffusers": diffusers, "transformers": transformers}
    for sampler in samplers.SAMPLERS.values():
        getattr(diffusers, sampler.scheduler)
    for index in families.CONFIGS.glob("*/model_index.json"):
        for name, value in json.loads(index.read_text(encoding="utf-8")).items():
            if name == "_class_name":
                getattr(diffusers, value)
            elif isinstance(value, list) and value[0] in libraries:
                getattr(libraries[value[0]], value[1])


def load_single_file(path: str | os.PathLike, family: str = "auto",
                     dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                     config: str | os.PathLike | None = None):
    """A pipeline from one checkpoint file, fully offline.

    family "auto" tells it from the keys (sd2-v must be named: its keys are sd2's). config
    is an escape hatch for architectures sdbatch does not ship (tiny test models): a diffusers
    folder whose model_index.json and component configs describe the file's models.
    """
    import diffusers

    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    path = Path(path)
    checkpoint = Checkpoint(path, dtype, allow_pickle)
    detected = families.detect_family(checkpoint.shapes)
    if family == "auto":
        family = detected
    else:
        families.check_compatible(family, detected, str(path))
    folder = Path(config) if config is not None else families.config_folder(family)
    if not (folder / "model_index.json").is_file():
        raise ModelFileError(f"config folder {folder} has no model_index.json; give a diffusers "
                             "folder that describes the checkpoint's models")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = getattr(diffusers, index["_class_name"])
    accepted = set(pipeline_class._get_signature_keys(pipeline_class)[0]) | set(
        pipeline_class._get_signature_keys(pipeline_class)[1])
    kwargs: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_") or name not in accepted:
            continue
        if isinstance(value, list) and len(value) == 2:
            library, class_name = value
            kwargs[name] = None if library is None else _component(
                name, library, class_name, checkpoint, folder, family, dtype, path)
        else:
            kwargs[name] = value
    if "add_watermarker" in accepted:
        kwargs["add_watermarker"] = False  # the WebUI does not watermark
    pipe = pipeline_class(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(path: str | os.PathLike, family: str, dtype: torch.dtype = torch.float32,
             allow_pickle: bool = False, config: str | os.PathLike | None = None):
    """A VAE override from a single file or a diffusers folder, scaled for the model's family.

    The latent scale belongs to the UNet's training (SDXL 0.13025, else 0.18215), so it comes
    from the family: a standalone SDXL VAE file has the same keys as an SD one and would
    otherwise get SD's scale. config: a folder with vae/config.json for unshipped models.
    """
    from diffusers import AutoencoderKL

    from sdbatch.models.stack import quiet_libraries

    quiet_libraries()
    path = Path(path)
    fam = families.family(family)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if not (path / (sub or "") / "config.json").is_file():
            raise ModelFileError(f"{path} is not a diffusers VAE folder (no config.json, no "
                                 "vae/config.json)")
        vae = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True,
                                            dtype=dtype)
    else:
        sd = read_state_dict(path, allow_pickle=allow_pickle)
        if not any(k.endswith("encoder.conv_in.weight") for k in sd):
            raise ModelFileError(f"{path} is not a VAE (it has no encoder.conv_in weights)")
        folder = Path(config) if config is not None else families.config_folder(family)
        try:
            vae = AutoencoderKL.from_single_file(sd, config=str(folder), subfolder="vae",
                                                 local_files_only=True, dtype=dtype)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ModelFileError(f"{path}: its weights do not fit the {family} VAE "
                                 f"({str(e).splitlines()[0]})") from e
        _check_loaded(vae, "VAE", path, family)
    vae.register_to_config(scaling_factor=fam.vae_scaling)
    return vae
