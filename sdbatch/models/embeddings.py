"""Textual inversion embeddings as the WebUI uses them: a file whose stem is a prompt word.

Formats read: A1111 .pt (string_to_param["*"], name, step...), kohya .safetensors
("emb_params"), single-key files (diffusers' learned_embeds), and SDXL pairs (clip_l for
the first text encoder, clip_g for the second). Vectors go into the tokenizer and text
encoder through diffusers' load_textual_inversion with an explicit token, after sdbatch
has read the file itself (pickles only with weights_only=True) and checked its width, so
a wrong embedding fails before any render instead of deep inside diffusers.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from sdbatch.models import hashing
from sdbatch.models.networks_errors import NetworkError

__all__ = ["Embedding", "NetworkError", "expand_triggers", "load_embedding", "read_embedding",
           "ti_hash", "write_a1111_embedding"]

WIDTHS = {768: "SD1.x (CLIP ViT-L)", 1024: "SD2.x (OpenCLIP ViT-H)", 1280: "SDXL's clip_g"}


@dataclass(frozen=True)
class Embedding:
    token: str  # the prompt word that triggers it
    path: Path
    vectors: int  # prompt tokens it takes
    hash: str  # the WebUI's "TI hashes" value


def ti_hash(path: Path) -> str:
    """The WebUI's "TI hashes" value: the first 12 hex of the file's sha256."""
    return hashing.sha256(Path(path))[:12]


def _as_matrix(path: Path, value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        raise NetworkError(f"{path}: {what} is not a vector or a matrix of vectors; this is not "
                           "a textual inversion embedding: use an A1111 or kohya embedding file")
    return (value[None] if value.ndim == 1 else value).detach().to(torch.float32)


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file: {"clip_l": ...} for SD1.x/SD2.x files, plus
    "clip_g" for SDXL ones; each a (vectors, width) float32 matrix."""
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"{path}: no such embedding file; check the path")
    try:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch

            data = safetensors.torch.load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NetworkError(f"{path}: cannot be read safely as an embedding ({type(e).__name__}: "
                           f"{e}); re-save it as .safetensors with an 'emb_params' key") from e
    if isinstance(data, torch.Tensor):
        return {"clip_l": _as_matrix(path, data, "the tensor")}
    if not isinstance(data, dict):
        raise NetworkError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise NetworkError(f"{path}: string_to_param must hold exactly one entry; "
                               "the file is not a usable A1111 embedding")
        return {"clip_l": _as_matrix(path, next(iter(params.values())), "string_to_param")}
    if "clip_g" in data and "clip_l" in data:  # SDXL
        return {k: _as_matrix(path, data[k], k) for k in ("clip_l", "clip_g")}
    if "emb_params" in data:  # kohya's sd-scripts
        return {"clip_l": _as_matrix(path, data["emb_params"], "emb_params")}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers' learned_embeds: {token: vector}
        return {"clip_l": _as_matrix(path, next(iter(tensors.values())), "its tensor")}
    raise NetworkError(f"{path}: not a textual inversion embedding (keys: "
                       f"{', '.join(map(str, list(data)[:6]))}); an embedding has "
                       "string_to_param, emb_params, clip_l + clip_g, or a single tensor")


# Embeddings loaded per tokenizer, so loading the same file twice is a no-op and a token
# already taken by another file is caught with both names.
_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encoder_width(encoder) -> int:
    return int(encoder.get_input_embeddings().weight.shape[1])


def load_embedding(pipe, path: Path, token: str | None = None) -> Embedding:
    """Teach the pipeline's tokenizer(s) and text encoder(s) an embedding, triggered by token
    (default: the file stem, as in the WebUI). Raises NetworkError before changing anything
    if the embedding does not fit the text encoder(s)."""
    path = Path(path)
    token = token or path.stem
    vectors = read_embedding(path)
    parts = [("clip_l", "tokenizer", "text_encoder")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.append(("clip_g", "tokenizer_2", "text_encoder_2"))
        if "clip_g" not in vectors:
            w = vectors["clip_l"].shape[1]
            raise NetworkError(f"{path}: a single-encoder embedding (width {w}, made for "
                               f"{WIDTHS.get(w, 'another model')}); an SDXL checkpoint needs "
                               "clip_l + clip_g vectors: use an SDXL embedding")
    elif "clip_g" in vectors:
        raise NetworkError(f"{path}: an SDXL embedding (clip_l + clip_g); this checkpoint has a "
                           "single text encoder: use an embedding made for its family")
    for key, _, enc_attr in parts:
        width, expected = vectors[key].shape[1], _encoder_width(getattr(pipe, enc_attr))
        if width != expected:
            raise NetworkError(
                f"{path}: embedding width {width} ({WIDTHS.get(width, 'unknown family')}) does "
                f"not match the text encoder's width {expected}"
                f"{' (' + WIDTHS[expected] + ')' if expected in WIDTHS else ''}; use an "
                "embedding trained for this checkpoint's family")
    record = Embedding(token, path, int(vectors["clip_l"].shape[0]), ti_hash(path))
    todo = []
    for key, tok_attr, enc_attr in parts:
        tokenizer = getattr(pipe, tok_attr)
        seen = _loaded.setdefault(tokenizer, {})
        if token in seen:
            if seen[token].hash == record.hash:
                continue
            raise NetworkError(f"{path}: its token {token!r} is already taken by "
                               f"{seen[token].path}; rename one of the files or give a token")
        if token in tokenizer.get_vocab() or f"{token}_1" in tokenizer.get_vocab():
            raise NetworkError(f"{path}: its token {token!r} is already a word of the "
                               "tokenizer's vocabulary; rename the file or give another token")
        todo.append((vectors[key], tokenizer, getattr(pipe, enc_attr), seen))
    for matrix, tokenizer, encoder, seen in todo:  # all checked: nothing half-loaded
        pipe.load_textual_inversion(matrix, token=token, tokenizer=tokenizer,
                                    text_encoder=encoder)
        _whole_words_only(tokenizer, token, record.vectors)
        seen[token] = record
    return record


def _whole_words_only(tokenizer, token: str, vectors: int) -> None:
    """The embedding's added tokens match whole words only: the WebUI finds an embedding
    by its name's own tokens, so "baddreams" does not trigger BadDream (a tokenizer's added
    token would match inside any word, in every prompt of the checkpoint). Fast tokenizers
    only (transformers 5's CLIP): a slow one's single_word glues the token to a comma
    right after it, and the embedding would not trigger at all."""
    from tokenizers import AddedToken

    if not getattr(tokenizer, "is_fast", False):
        return
    names = [token, *(f"{token}_{i}" for i in range(1, vectors))]
    tokenizer.add_tokens([AddedToken(n, single_word=True) for n in names])  # same ids


def expand_triggers(tokenizer, text: str) -> str:
    """Spell out multi-vector triggers ("tok" -> "tok tok_1 tok_2") before tokenizing.

    diffusers stores an n-vector embedding as n added tokens and expands them in
    maybe_convert_prompt, which misses triggers whose case differs from the tokenizer's
    lowercased output (most embedding names). This matches as the tokenizer does:
    case-insensitive, longest token first, whole words only.
    """
    added = _added_tokens(tokenizer)
    multi = {t: n for t, n in vector_counts(tokenizer).items() if n > 1}
    if not multi:
        return text
    alternatives = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)  # whole words

    def spell(match: re.Match) -> str:
        found = next((t for t in multi if t.lower() == match.group(0).lower()), None)
        if found is None:
            return match.group(0)
        return " ".join([match.group(0), *(f"{found}_{i}" for i in range(1, multi[found]))])

    return pattern.sub(spell, text)


def _added_tokens(tokenizer) -> set[str]:
    special = set(tokenizer.all_special_tokens)
    return {t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t not in special}


def vector_counts(tokenizer) -> dict[str, int]:
    """Each embedding the tokenizer was taught, by its trigger token -> its vector count:
    diffusers names an n-vector embedding's added tokens t, t_1 ... t_{n-1}."""
    added = _added_tokens(tokenizer)
    counts = {}
    for token in added:
        if re.fullmatch(r"(.+)_\d+", token) and token.rsplit("_", 1)[0] in added:
            continue  # a later vector of another token's embedding
        n = 1
        while f"{token}_{n}" in added:
            n += 1
        counts[token] = n
    return counts


def write_a1111_embedding(path: Path, vectors, name: str | None = None, step: int = 0) -> Path:
    """Write an embedding the way the WebUI (.pt) or kohya (.safetensors) does; same bytes
    for the same arguments. vectors: a (n, width) tensor, or {"clip_l": ..., "clip_g": ...}
    for SDXL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(vectors, dict):
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in vectors.items()}
    else:
        tensors = {"emb_params": vectors.detach().to(torch.float32).contiguous()}
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file(tensors, str(path))
        return path
    if isinstance(vectors, dict):
        data = dict(tensors)
    else:
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensors["emb_params"]},
                "name": name or path.stem, "step": step, "sd_checkpoint": None,
                "sd_checkpoint_name": None}
    torch.save(data, path)
    return path
