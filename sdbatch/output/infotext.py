"""The A1111 infotext: the `parameters` text the WebUI, Civitai and PNG readers understand."""

from __future__ import annotations

import json
from typing import Any


def quote(value: Any) -> str:
    """The WebUI's rule: a value with ',', ':' or a newline is written JSON-quoted."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def number(x: float) -> str:
    """7.0 -> '7', 7.5 -> '7.5', as the WebUI shows CFG scale and weights."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """prompt, 'Negative prompt: ...' (only when non-empty), then 'Key: value, ...'.

    ``params`` is in the WebUI's key order; None values are dropped.
    """
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an infotext back: (prompt, negative prompt, parameters as strings)."""
    lines = text.split("\n")
    params_line = lines[-1] if len(lines) > 1 else ""
    body = lines[:-1] if len(lines) > 1 else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt: "):
            in_negative = True
            line = line[len("Negative prompt: "):]
        (negative_lines if in_negative else prompt_lines).append(line)
    params: dict[str, str] = {}
    i = 0
    while i < len(params_line):
        colon = params_line.find(": ", i)
        if colon < 0:
            break
        key = params_line[i:colon].strip()
        j = colon + 2
        if params_line.startswith('"', j):
            value, end = json.JSONDecoder().raw_decode(params_line, j)
        else:
            end = params_line.find(", ", j)
            end = len(params_line) if end < 0 else end
            value = params_line[j:end]
        params[key] = value
        i = end + 2 if params_line.startswith(", ", end) else end + 1
    return "\n".join(prompt_lines), "\n".join(negative_lines), params
