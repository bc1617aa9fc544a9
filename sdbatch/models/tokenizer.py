"""CLIP tokenizer files made on the spot, so no tokenizer is ever downloaded."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_vocab() -> dict[str, int]:
    """A CLIP vocabulary with no merges: every byte, alone and word-final, plus the specials.

    It tokenizes any text (one token per byte) and keeps CLIP's BOS/EOS conventions.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_files(folder: Path, vocab: dict[str, int], merges: list[str],
                     pad_token: str = EOS) -> None:
    """vocab.json, merges.txt ("a b" lines) and the configs that CLIPTokenizer loads from,
    in transformers 4 and 5 alike: every offline tokenizer of sdbatch is written here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges),
                                       encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
              "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def write_byte_level_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """A CLIP tokenizer with the byte-level vocabulary and no merges.

    pad_token is EOS for OpenAI CLIP and "!" for OpenCLIP (SD2, SDXL's second encoder).
    """
    write_clip_files(folder, byte_level_vocab(), [], pad_token)
