"""The text files users hand sdbatch (jobs, prompt files, styles.csv, wildcards) as Windows
tools save them: UTF-8 with or without a byte-order mark, or UTF-16 with one (PowerShell
5's `>`). Anything else is refused with the file named, never misread."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class TextFileError(ValueError):
    pass


def decode(data: bytes, path: str | os.PathLike) -> str:
    utf16 = data.startswith(UTF16_BOMS)
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        what = ("UTF-16 as its byte-order mark says" if utf16
                else f"UTF-8 (byte {e.start} is 0x{data[e.start]:02x}: saved in a Windows "
                "code page?)")
        raise TextFileError(f"{path} is not {what}: save it as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    return decode(Path(path).read_bytes(), path)


def plain_utf8_problem(path: Path) -> str | None:
    """Why a file a library reads as bare UTF-8 (dynamicprompts' wildcards: errors ignored)
    would be misread: a byte-order mark, UTF-16, another encoding; None when it is fine."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF8, *UTF16_BOMS)):
        kind = "UTF-8" if data.startswith(codecs.BOM_UTF8) else "UTF-16"
        return (f"{path} starts with a {kind} byte-order mark: its values would carry it "
                "or be garbled; save it as UTF-8 without BOM")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"{path} is not UTF-8 (byte {e.start} is 0x{data[e.start]:02x}): its "
                "characters would be dropped; save it as UTF-8")
    return None
