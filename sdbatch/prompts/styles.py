"""The WebUI's styles: named prompt snippets from its styles.csv, used as is.

A style's text replaces the `{prompt}` placeholder with the prompt, or is appended with ", ".
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sdbatch.text_files import read_text

Style = tuple[str, str]  # (prompt, negative prompt)


def load_styles(path: Path) -> dict[str, Style]:
    """name -> (prompt, negative) from the WebUI's styles.csv: columns name, prompt (or
    text, in older files), negative_prompt, spaces after the commas skipped as it does.
    TextFileError for a file that is not UTF-8 (or UTF-16)."""
    styles: dict[str, Style] = {}
    for row in csv.DictReader(io.StringIO(read_text(path), newline=""), skipinitialspace=True):
        name = (row.get("name") or "").strip()
        if name:
            prompt = row["prompt"] if "prompt" in row else row.get("text")
            styles[name] = (prompt or "", row.get("negative_prompt") or "")
    return styles


def apply_style(prompt: str, style: str) -> str:
    """The WebUI's merge_prompts: the style's {prompt} replaced, else both stripped and the
    non-empty ones joined by ", " (a prompt ending in a newline loses it; an empty style
    still strips the prompt)."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(prompt: str, negative: str, styles: list[Style]) -> tuple[str, str]:
    for style_prompt, style_negative in styles:
        prompt = apply_style(prompt, style_prompt)
        negative = apply_style(negative, style_negative)
    return prompt, negative
