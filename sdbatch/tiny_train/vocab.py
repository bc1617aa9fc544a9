"""A CLIP BPE tokenizer whose merges make each caption word one token, bytes for the rest.

A 2-layer, 64-wide text encoder learns "red" much faster as one token than as three bytes,
and a long caption fits CLIP's 77 tokens only if words are single tokens. Any other text
still tokenizes, byte by byte, as in CLIP. The files are CLIP's own format (vocab.json,
merges.txt), so transformers' CLIPTokenizer loads them like any SD1.x tokenizer.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from sdbatch.models.tokenizer import BOS, EOS, bytes_to_unicode, write_clip_files


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (already in byte-unicode characters)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into a single token.

    Each new merge ranks after all earlier ones, so it never changes how an earlier word
    splits: earlier words stay one token whatever later words add.
    """
    table = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        text = "".join(table[b] for b in word.lower().encode())
        while len(parts := _bpe(text, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(bytes_to_unicode().values())
    merges = merges_for(words)
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, words: list[str]) -> dict[str, int]:
    """Write a CLIPTokenizer folder for ``words``; returns its vocabulary."""
    vocab, merges = vocab_and_merges(words)
    write_clip_files(folder, vocab, [f"{a} {b}" for a, b in merges])
    return vocab
