"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary file shipped in the package.

Token ids decide where a long prompt is cut into 75-token chunks and which commas it may back
up to, so tests and single-file checkpoints need the real vocabulary, and no machine here can
download one. Every SD text encoder (CLIP-L for SD1, OpenCLIP-H for SD2, both for SDXL) uses
this same 49408-entry vocabulary; only the padding token differs.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from sdbatch import atomic
from sdbatch.models.tokenizer import BOS, EOS, bytes_to_unicode, write_clip_files

VERSION = "1"  # bump when the files written here change
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file; the rest are unused
PAD_SD1 = EOS  # CLIP-L (SD1.x) pads with <|endoftext|>
PAD_OPENCLIP = "!"  # OpenCLIP (SD2.x, SDXL's second encoder) pads with "!" (id 0)


@functools.cache
def clip_merges() -> tuple[str, ...]:
    """The BPE merges, one "a b" pair a line, in priority order."""
    raw = resources.files("sdbatch.models").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return tuple(lines[1:N_MERGES + 1])  # line 0 is the file's header


def clip_vocab(merges: Sequence[str] | None = None) -> dict[str, int]:
    """Token -> id exactly as CLIP numbers them: bytes, word-final bytes, merges, specials."""
    merges = clip_merges() if merges is None else merges
    chars = sorted(bytes_to_unicode().values(), key=ord)  # CLIP's order: printable bytes first
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, pad_token: str = PAD_SD1) -> None:
    """Write vocab.json, merges.txt and configs that CLIPTokenizer (transformers 4 and 5) loads."""
    merges = clip_merges()
    vocab = clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    write_clip_files(folder, vocab, list(merges), pad_token)


def ensure_clip_tokenizer(pad_token: str = PAD_SD1) -> Path:
    """A cached tokenizer folder for this pad token, written once and atomically."""
    from sdbatch.models.tiny import cache_root

    pad_id = _pad_id(pad_token)
    return atomic.build_folder(cache_root() / "tokenizers" / f"clip-bpe-v{VERSION}-pad{pad_id}",
                               "tokenizer_config.json",
                               lambda tmp: write_clip_tokenizer(tmp, pad_token))


def _pad_id(pad_token: str) -> int:
    """The pad token's id, so that a cache folder is named by what it contains."""
    vocab = clip_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    return vocab[pad_token]
