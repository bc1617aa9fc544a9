"""Text -> CLIP embeddings, with the WebUI's clip skip.

sdbatch encodes prompts itself and hands the embeddings to the pipeline: the pipelines'
own clip_skip breaks on transformers >= 5.6, and the WebUI's prompt syntax needs it anyway.
Clip skip N takes the hidden state N-1 layers before the last and applies the final layer
norm, as the WebUI does ("Clip skip: 2" = the penultimate layer). SDXL has two encoders and a
pooled embedding: encode_sdxl.
"""

from __future__ import annotations

import torch

from sdbatch.prompts.conditioning import encode_prompts


def encode(tokenizer, text_encoder, texts: list[str], clip_skip: int,
           device: torch.device) -> torch.Tensor:
    """(batch, 77 * chunks, dim): every text padded to the longest one's chunk count."""
    return encode_prompts(tokenizer, text_encoder, texts, clip_skip, device)


@torch.no_grad()
def encode_sdxl(tokenizers, text_encoders, texts: list[str], clip_skip: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: (both encoders' hidden states side by side, pooled embedding).

    SDXL was trained on the penultimate layer of both encoders with no final layer norm, so
    clip skip 1 and 2 are the same (the WebUI ignores it for SDXL); N > 2 goes further back on
    both. The pooled embedding is the second encoder's projection of its end token.
    """
    layer = -max(2, clip_skip)
    hidden = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = text_encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[layer])
    return torch.cat(hidden, dim=-1), out.text_embeds
