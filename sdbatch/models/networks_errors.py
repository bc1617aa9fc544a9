"""The one error the extra-network modules raise (LoRA, embeddings, hypernetworks).

A ValueError subclass, so callers that already report bad job values catch it too; its
message always names the file and says what to do instead.
"""

from __future__ import annotations


class NetworkError(ValueError):
    """An extra network that cannot be used with this model; the message names file and fix."""
