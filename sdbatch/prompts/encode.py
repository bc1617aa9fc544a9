"""Text -> CLIP embeddings, with the WebUI's clip skip.

sdbatch encodes prompts itself and hands the embeddings to the pipeline: the pipelines'
own clip_skip breaks on transformers >= 5.6, and the WebUI's prompt syntax needs it anyway.
Clip skip N takes the hidden state N-1 layers before the last and applies the final layer
norm, as the WebUI does ("Clip skip: 2" = the penultimate layer).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode(tokenizer, text_encoder, texts: list[str], clip_skip: int,
           device: torch.device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    if clip_skip <= 1:
        return text_encoder(ids).last_hidden_state
    out = text_encoder(ids, output_hidden_states=True)
    return text_encoder.final_layer_norm(out.hidden_states[-clip_skip])
