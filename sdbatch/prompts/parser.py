"""The WebUI's prompt syntax as pure functions: emphasis, BREAK, editing, alternation, networks.

Users bring prompts written for the AUTOMATIC1111 WebUI, so every quirk matters: how an
unbalanced bracket is read, which step a "[from:to:0.5]" switches at, that a prompt with a
stray "|" is taken literally. This module reproduces the WebUI's behaviour (v1.10:
modules/prompt_parser.py, modules/extra_networks.py) without its lark dependency; the
order of operations is kept so that weights come out as the very same floats.

The WebUI applies the three steps in this order, and so should callers:
extract_extra_networks -> schedules / prompt_at_step -> parse_emphasis (while encoding).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # ("BREAK", -1.0) marks a chunk break in parse_emphasis' output

# ---------------------------------------------------------------------------- emphasis

_EMPHASIS_TOKEN = re.compile(r"""
      \\[()\[\]\\]              # escaped bracket or backslash: the character itself
    | \\                        # any other backslash: dropped
    | [(\[]                     # openers
    | :\s*([+-]?[.\d]+)\s*\)    # explicit weight, closing a round bracket
    | [)\]]                     # closers
    | [^\\()\[\]:]+             # text
    | :                         # a colon that is not a weight
""", re.X)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND, _SQUARE = 1.1, 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs the way the WebUI's parse_prompt_attention does.

    (x) x1.1, [x] /1.1, (x:1.3), nesting multiplies, \\( \\) \\[ \\] \\\\ are literal, a closer
    with no opener is text, an opener never closed still applies to the end of the prompt.
    "BREAK" as its own upper-case word becomes the entry ("BREAK", -1.0); inside brackets
    it is scaled like any text and so is no longer a break (as in the WebUI).
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token[0] == "\\":
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), _weight(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), _ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i:
                    runs.append([BREAK, BREAK_WEIGHT])
                runs.append([part, 1.0])

    for start in round_open:
        scale(start, _ROUND)
    for start in square_open:
        scale(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for part, weight in runs or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged


def _weight(number: str) -> float:
    try:
        return float(number)
    except ValueError:  # "(x:1.2.3)": the WebUI fails the whole generation here too
        raise ValueError(f"bad emphasis weight {number!r} in prompt") from None


def is_break(run: tuple[str, float]) -> bool:
    return run[0] == BREAK and run[1] == BREAK_WEIGHT


# ---------------------------------------------------------- prompt editing and alternation

@dataclass(frozen=True)
class _Edit:
    """[before:after:when]; before is None for the two-part form [after:when]."""
    before: tuple | None
    after: tuple
    when: str  # as written: a "." makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple


_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
_WHEN_CLOSE = re.compile(rf"\s*({_NUMBER})\s*\]")


class _Parser:
    """Recursive descent over the WebUI's schedule grammar.

    Inside brackets every "[", "(", ":" and "|" must belong to a construct; at the top level
    brackets and colons that fit nothing are literal text. A "|" outside an alternation or a
    trailing lone backslash makes the whole prompt literal, as lark's parse error does there.
    Known difference: when an edit's closing "]" is directly followed by stray brackets or
    colons ("[a:b:3]::"), the WebUI's ambiguous Earley parse sometimes reads the edit as
    literal text, by no simple rule; here it is always an edit.
    """

    def __init__(self, text: str):
        self.text = text

    def parse(self) -> tuple | None:
        text, nodes, i = self.text, [], 0
        while True:
            part, i = self.prompt(i)
            nodes += part
            if i == len(text):
                return tuple(nodes)
            if text[i] not in "[]():":
                return None
            nodes.append(text[i])
            i += 1

    def prompt(self, i: int) -> tuple[list, int]:
        text, nodes = self.text, []
        while i < len(text):
            if plain := _PLAIN.match(text, i):
                nodes.append(plain.group(0))
                i = plain.end()
                continue
            opener = {"[": self.square, "(": self.round}.get(text[i])
            parsed = opener(i) if opener else None
            if parsed is None:
                break
            nodes += parsed[0]
            i = parsed[1]
        return nodes, i

    def at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def round(self, i: int) -> tuple[list, int] | None:
        first, j = self.prompt(i + 1)
        if self.at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self.at(j) == ":":
            second, k = self.prompt(j + 1)
            if self.at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def square(self, i: int) -> tuple[list, int] | None:
        first, j = self.prompt(i + 1)
        sep = self.at(j)
        if sep == "]":
            return ["[", *first, "]"], j + 1
        if sep == "|":
            options = [tuple(first)]
            while self.at(j) == "|":
                option, j = self.prompt(j + 1)
                options.append(tuple(option))
            if self.at(j) == "]":
                return [_Alternate(tuple(options))], j + 1
            return None
        if sep == ":":
            if when := _WHEN_CLOSE.match(self.text, j + 1):
                return [_Edit(None, tuple(first), when.group(1))], when.end()
            second, k = self.prompt(j + 1)
            if self.at(k) == ":" and (when := _WHEN_CLOSE.match(self.text, k + 1)):
                return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
        return None


def _switch_step(when: str, steps: int, int_offset: int, frac_offset: float) -> int:
    value = float(when)
    value = (value - frac_offset) * steps if "." in when else value - int_offset
    return min(steps, int(value))


def schedules(text: str, steps: int, *, hires_steps: int | None = None
              ) -> list[tuple[int, str]]:
    """The prompt's timeline: (last step, prompt text) pairs, as get_learned_conditioning_...

    "[a:b:when]" shows a up to step `when` and b after it; an integer is a step, a number
    with a "." a fraction of the steps (so "1.0" is the end, "1" the first step).
    "[a:when]" adds a, "[a::when]" removes it; alternation "[a|b]" lists every step.
    With hires_steps the timeline is that of the WebUI's hires pass: integers count on
    from the first pass (15 = step 5 of the second pass after 10), fractions from 1.0.
    Text that the WebUI's grammar rejects comes back unchanged as one entry.
    """
    int_offset, frac_offset, total = 0, 0.0, steps
    if hires_steps is not None:
        int_offset, frac_offset, total = steps, 1.0, hires_steps

    try:
        tree = _Parser(text).parse()
    except RecursionError:  # hundreds of nested brackets; the WebUI fails here too
        raise ValueError("prompt nests brackets too deeply to parse") from None
    if tree is None:
        return [(total, text)]

    def when(edit: _Edit) -> int:
        return _switch_step(edit.when, total, int_offset, frac_offset)

    ends = {total}

    def collect(nodes) -> None:
        for node in nodes:
            if isinstance(node, _Edit):
                if when(node) >= 1:
                    ends.add(when(node))
                collect(node.before or ())
                collect(node.after)
            elif isinstance(node, _Alternate):
                ends.update(range(1, total + 1))
                for option in node.options:
                    collect(option)

    def render(nodes, step: int) -> str:
        out = []
        for node in nodes:
            if isinstance(node, _Edit):
                out.append(render(node.before or () if step <= when(node) else node.after, step))
            elif isinstance(node, _Alternate):
                out.append(render(node.options[(step - 1) % len(node.options)], step))
            else:
                out.append(node)
        return "".join(out)

    collect(tree)
    return [(end, render(tree, end)) for end in sorted(ends)]


def prompt_at_step(text: str, step: int, steps: int, *, hires_steps: int | None = None) -> str:
    """The prompt the WebUI conditions on at sampling step `step` (0-based, as it counts).

    The WebUI picks the first timeline entry whose last step is >= the number of denoiser
    calls made so far, so step 0 and step 1 both see the first entry: "[a|b]" reads
    a, a, b, a, b, ... and "[a:b:3]" shows a for four steps. That is kept, so that images
    match. For samplers that call the model twice a step (Heun, DPM2, DPM++ SDE) the WebUI
    builds the timeline over steps x 2 and counts calls: pass those (sdbatch.sampling).
    """
    timeline = schedules(text, steps, hires_steps=hires_steps)
    return next((t for end, t in timeline if step <= end), timeline[0][1])


# ------------------------------------------------------------------ composable prompts

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(text: str) -> list[tuple[str, float]]:
    """The WebUI's composable prompt: "a cat AND a dog :1.2" -> [("a cat", 1.0), (" a dog", 1.2)].

    Split on the upper-case word AND anywhere (brackets are not looked at, as in the
    WebUI's get_multicond_prompt_list); a trailing ":number" is the part's weight. Each
    part is then a prompt of its own, with its own editing schedule. Only the prompt is
    split: the WebUI encodes the negative prompt as it is, "AND" as a word.
    """
    parts = []
    for part in _AND.split(text):
        match = _PART_WEIGHT.match(part)
        body, weight = match.group(1), match.group(2)
        parts.append((body, float(weight) if weight is not None else 1.0))
    return parts


def has_and(text: str) -> bool:
    """Whether a prompt composes parts with AND (for stages that cannot guide with them)."""
    return bool(_AND.search(text))


# ---------------------------------------------------------------------- extra networks

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
ALIASES = {"lyco": "lora"}  # the WebUI's Lora extension takes <lyco:...> as <lora:...>


class ExtraNetwork(NamedTuple):
    """One <kind:name:arg:...> tag, e.g. <lora:detail:0.8:te=0.5>."""
    kind: str
    name: str
    args: tuple[str, ...]

    @property
    def network(self) -> str:
        """The kind of network the tag applies: a <lyco:...> tag is a LoRA's."""
        return ALIASES.get(self.kind, self.kind)

    @property
    def named(self) -> dict[str, str]:
        """key=value arguments (te=, unet=, dyn=)."""
        return dict(a.split("=", 1) for a in self.args if len(a.split("=", 2)) == 2)

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(a for a in self.args if len(a.split("=", 2)) != 2)

    def multipliers(self) -> tuple[float, float]:
        """(text encoder, UNet) strengths as the WebUI's Lora extension reads them.

        <lora:x> is 1.0; <lora:x:w> sets both; a second positional number or unet= sets the
        UNet's alone; te= overrides the first. A hypernet's strength is the first value.
        """
        pos, named = self.positional, self.named
        te = float(named.get("te", pos[0] if pos else 1.0))
        unet = float(named.get("unet", pos[1] if len(pos) > 1 else te))
        return te, unet

    def lora_weight(self) -> float | tuple[float, float]:
        """The tag's LoRA weight: one number when both parts take it, else (te, unet)."""
        return lora_weight(*self.multipliers())

    def problem(self) -> str | None:
        """Why a LoRA or hypernetwork tag cannot be applied as written, or None.

        The WebUI's third positional number or dyn= cuts a dynamic LoRA to its first ranks;
        sdbatch applies a LoRA whole, so a tag asking for it is refused, not rendered
        otherwise than it says.
        """
        tag = f"<{self.kind}:{':'.join((self.name, *self.args))}>"
        try:
            te, unet = self.multipliers()
        except ValueError:
            return f"{tag}: a weight is not a number; write e.g. <{self.kind}:{self.name}:0.8>"
        if not (math.isfinite(te) and math.isfinite(unet)):
            return f"{tag}: weights must be finite numbers"
        if self.network == "lora" and (len(self.positional) > 2 or "dyn" in self.named):
            return (f"{tag}: dyn (a third number, or dyn=) cuts a dynamic LoRA's rank, which "
                    "sdbatch does not do; remove it to apply the whole LoRA")
        if self.network == "hypernet" and te != unet:
            return (f"{tag}: a hypernetwork takes one strength; give one number, "
                    f"e.g. <hypernet:{self.name}:{te:g}>")
        return None


def lora_weight(te: float, unet: float) -> float | tuple[float, float]:
    """A LoRA's weight as sdbatch carries it: one number when the text encoder and the UNet
    take the same (so a split tag of equal weights is the same render), else (te, unet)."""
    return te if te == unet else (te, unet)


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove <kind:name:args> tags from a prompt, returning the text and the tags in order.

    Only the tag is removed, not the space or comma around it, as in the WebUI: the
    leftover text is what gets encoded and so must match it character for character.
    """
    found: list[ExtraNetwork] = []

    def take(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.append(ExtraNetwork(match.group(1), name, tuple(args)))
        return ""

    return _EXTRA_NETWORK.sub(take, text), found
