"""The WebUI's styles: named prompt snippets from its styles.csv, used as is.

A style's text replaces the `{prompt}` placeholder with the prompt, or is appended with ", ".
"""

from __future__ import annotations

import csv
from pathlib import Path

Style = tuple[str, str]  # (prompt, negative prompt)


def load_styles(path: Path) -> dict[str, Style]:
    """name -> (prompt, negative) from a styles.csv with columns name,prompt,negative_prompt."""
    styles: dict[str, Style] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            name = (row.get("name") or "").strip()
            if name:
                styles[name] = (row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def apply_style(prompt: str, style: str) -> str:
    if not style:
        return prompt
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return f"{prompt}, {style}" if prompt else style


def apply_styles(prompt: str, negative: str, styles: list[Style]) -> tuple[str, str]:
    for style_prompt, style_negative in styles:
        prompt = apply_style(prompt, style_prompt)
        negative = apply_style(negative, style_negative)
    return prompt, negative
