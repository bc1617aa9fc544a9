"""Hugging Face hub ids ("org/name") as checkpoints, for machines that reach the hub.

A hub id is turned into a local diffusers folder while the job is checked (downloaded once,
then served from the Hugging Face cache), so loading is the same offline folder load as
everywhere else. With HF_HUB_OFFLINE=1 only what the cache already holds works, and a
missing id is an error before any work.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]


class HubError(LookupError):
    pass


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def fetch(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(snapshot_download(repo_id, allow_patterns=PATTERNS,
                                      local_files_only=HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds
        how = ("HF_HUB_OFFLINE is set and the Hugging Face cache does not hold it: run once "
               "with network, or give a file or folder") if HF_HUB_OFFLINE else \
            f"{type(e).__name__}: {e}"
        raise HubError(f"'{repo_id}' looks like a hub id but cannot be had: {how}") from None
