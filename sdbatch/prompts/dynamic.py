"""Dynamic prompts with the dynamicprompts library: {a|b} variants, {0.7::a|0.3::b} weights,
{2$$a|b|c}, and __wildcard__ files.

combinatorial: every variant of a prompt is a value of the prompt axis; a prompt with more than
max_variants variants is refused (the library would drop the rest silently).
random: each image picks its variant with a generator seeded by the image's seed, so a seed
reproduces its prompt. An unknown wildcard is an error before any work (the library would
otherwise write it literally, or loop in combinatorial mode).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dynamicprompts.commands import WildcardCommand
from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.parser.parse import parse
from dynamicprompts.wildcards import WildcardManager

from sdbatch.text_files import plain_utf8_problem


def _wildcards(command) -> list[str]:
    if isinstance(command, WildcardCommand):
        return [command.wildcard]
    found = []
    children = []
    if dataclasses.is_dataclass(command):
        children = [getattr(command, f.name) for f in dataclasses.fields(command)]
    for child in children:
        for item in child if isinstance(child, list | tuple) else [child]:
            if dataclasses.is_dataclass(item):
                found += _wildcards(item)
    return found


class DynamicPrompts:
    def __init__(self, mode: str, wildcards: Path, max_variants: int):
        self.mode = mode
        self.max_variants = max_variants
        self.manager = WildcardManager(wildcards)
        self.folder = wildcards

    def problems(self, template: str) -> list[str]:
        """Unknown wildcards in a template (and in the wildcard files it reaches), or more
        combinatorial variants than max_variants (the library would drop the rest silently)."""
        if self.mode == "off":
            return []
        missing, seen, todo = [], set(), [template]
        while todo:
            text = todo.pop()
            try:
                tree = parse(text)
            except Exception as e:  # noqa: BLE001 - the library raises several parse errors
                return [f"cannot parse '{text}': {e}; it reads as dynamic prompts syntax "
                        "({a|b}, __wildcard__): set dynamic_prompts.mode=off to take the "
                        "prompt as written"]
            for name in _wildcards(tree):
                if name in seen:
                    continue
                seen.add(name)
                file = self.folder / f"{name}.txt"
                if file.is_file() and (why := plain_utf8_problem(file)):
                    return [f"wildcard __{name}__: {why}"]
                values = self.manager.get_all_values(name)
                if not values:
                    missing.append(name)
                todo += [str(v) for v in values]
        if not missing:
            return self._too_many(template)
        known = sorted(self.manager.get_collection_names()) if self.folder.is_dir() else []
        where = f"in {self.folder}" if self.folder.is_dir() else f"({self.folder} does not exist)"
        listing = f"; wildcards there: {', '.join(known[:12])}" if known else ""
        return [f"unknown wildcard(s) {', '.join(f'__{m}__' for m in missing)} {where}{listing}"]

    def _too_many(self, template: str) -> list[str]:
        if self.mode != "combinatorial" or not _dynamic(template):
            return []
        try:
            found = CombinatorialPromptGenerator(self.manager).generate(
                template, max_prompts=self.max_variants + 1)
        except RecursionError:  # a wildcard that names itself: endless in this mode
            return [f"'{template}' never ends in combinatorial mode: a wildcard names itself "
                    "(directly or through others); break the loop, or pick one per image "
                    "with dynamic_prompts.mode=random"]
        if len(found) <= self.max_variants:
            return []
        return [f"'{template}' has more than {self.max_variants} combinatorial variants, over "
                f"dynamic_prompts.max_variants = {self.max_variants}: raise it, shorten the "
                "prompt's {a|b} choices, or pick one per image with dynamic_prompts.mode=random"]

    def variants(self, template: str) -> list[str]:
        """The values a template gives the prompt axis."""
        if self.mode != "combinatorial" or not _dynamic(template):
            return [template]
        return list(dict.fromkeys(CombinatorialPromptGenerator(self.manager).generate(
            template, max_prompts=self.max_variants)))

    def pick(self, template: str, seed: int) -> str:
        """The variant one image renders (random mode: seeded by the image's seed)."""
        if self.mode != "random" or not _dynamic(template):
            return template
        return RandomPromptGenerator(self.manager, seed=seed).generate(template, 1)[0]


def _dynamic(text: str) -> bool:
    return "{" in text or "__" in text
