"""Text -> CLIP embeddings, with the WebUI's clip skip, emphasis, BREAK and long prompts.

sdbatch encodes prompts itself and hands the embeddings to the pipeline: the pipelines'
own clip_skip breaks on transformers >= 5.6, and the WebUI's prompt syntax needs it anyway.
Clip skip N takes the hidden state N-1 layers before the last and applies the final layer
norm, as the WebUI does ("Clip skip: 2" = the penultimate layer), except on SD2's OpenCLIP
and SDXL, which the WebUI gives their penultimate layer whatever it says. SDXL has two
encoders and a pooled embedding: encode_sdxl. The work is done in
sdbatch.prompts.conditioning; these names stay for the stages and tests that call them.
"""

from __future__ import annotations

import torch

from sdbatch.prompts.conditioning import encode_prompts, encode_prompts_sdxl


def encode(tokenizer, text_encoder, texts: list[str], clip_skip: int,
           device: torch.device) -> torch.Tensor:
    """(batch, 77 * chunks, dim): every text padded to the longest one's chunk count."""
    return encode_prompts(tokenizer, text_encoder, texts, clip_skip, device)


def encode_sdxl(tokenizers, text_encoders, texts: list[str],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """((batch, 77 * chunks, both widths), pooled (batch, projection)); see encode_prompts_sdxl
    (no clip skip: the WebUI applies none to SDXL)."""
    return encode_prompts_sdxl(tokenizers, text_encoders, texts, device)
