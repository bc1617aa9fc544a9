"""Which textual-inversion embeddings a prompt triggers, decided from the text alone.

The WebUI tokenizes the prompt with CLIP and looks for each embedding name's token ids as a
run of the prompt's token ids (modules/textual_inversion EmbeddingDatabase
.find_embedding_at_position, longest name first). CLIP's tokenizer lowercases the text and
cuts it into words (runs of letters, single digits, runs of other symbols) before BPE, and
every word's last token marks the word's end. So the rule sdbatch applies, before any model
is loaded, is: lowercase, cut prompt and name into CLIP's words, and the name triggers where
its words appear as consecutive words of the prompt; at one place the longest name wins.
`easynegative, blurry` and `(EasyNegative:1.2)` trigger `easynegative`; `easynegatives`,
`easy negative` and `night(sky)` do not. The one case where the WebUI can differ is a name
that BPE happens to split off inside a longer word (`super` + `nightsky`), which it
triggers and sdbatch does not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# CLIP's pre-tokenizer pattern (letters, one digit, other symbols) with Python's classes
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def words(text: str) -> tuple[str, ...]:
    """The text as CLIP's tokenizer cuts it into words, lowercased."""
    return tuple(_WORD.findall(" ".join(text.lower().split())))


def triggered(texts: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The names that trigger in the texts, in order of first appearance."""
    by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for name in names:
        w = words(name)
        if w:
            by_first.setdefault(w[0], []).append((w, name))
    for options in by_first.values():
        options.sort(key=lambda o: -len(o[0]))
    found: dict[str, None] = {}
    for text in texts:
        ws = words(text)
        i = 0
        while i < len(ws):
            match = next(((w, n) for w, n in by_first.get(ws[i], ())
                          if ws[i:i + len(w)] == w), None)
            if match is None:
                i += 1
                continue
            found[match[1]] = None
            i += len(match[0])
    return tuple(found)
