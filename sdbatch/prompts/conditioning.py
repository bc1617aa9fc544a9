"""Prompt text -> CLIP conditioning the way the WebUI builds it (modules/sd_hijack_clip.py).

A prompt is split into emphasis runs, tokenized run by run, and cut into chunks of 75
tokens; each chunk gets BOS/EOS (77 tokens), is encoded on its own, and the chunks are
concatenated along the sequence. So prompts are not truncated at 75 tokens, and BREAK and
commas move chunk boundaries exactly where WebUI users expect them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sdbatch.models.embeddings import vector_counts
from sdbatch.prompts.parser import is_break, parse_emphasis

CHUNK = 75  # prompt tokens per chunk; + BOS and EOS = CLIP's 77
COMMA_BACKTRACK = 20  # the WebUI's default "comma_padding_backtrack"


@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, 75 prompt or padding tokens, EOS) and one emphasis weight each."""
    tokens: tuple[int, ...]
    weights: tuple[float, ...]


Run = tuple[Sequence[int], float] | None  # token ids and their weight; None is a BREAK


def build_chunks(runs: Sequence[Run], *, bos: int, eos: int, comma: int | None,
                 backtrack: int = COMMA_BACKTRACK,
                 embeddings: Mapping[int, int] | None = None) -> list[Chunk]:
    """Cut tokenized runs into chunks as the WebUI's tokenize_line does.

    A chunk holds 75 tokens. When a token would overflow it and a comma sits within the
    last `backtrack` tokens, everything after that comma moves to the next chunk, so a
    phrase is not split between two chunks. BREAK closes the chunk, padding it with EOS.
    An embedding (``embeddings``: its first token id -> its vector count) is not split
    either: one that does not fit the chunk starts the next.
    """
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        pad = CHUNK - len(tokens)
        chunks.append(Chunk((bos, *tokens, *[eos] * pad, eos),
                            (1.0, *weights, *[1.0] * pad, 1.0)))
        tokens, weights, last_comma = [], [], -1

    for run in runs:
        if run is None:
            close()
            continue
        ids, weight = run
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == CHUNK and last_comma != -1
                  and CHUNK - last_comma <= backtrack):
                keep = last_comma + 1
                moved = tokens[keep:], weights[keep:]
                tokens, weights = tokens[:keep], weights[:keep]
                close()
                tokens, weights = moved
            if len(tokens) == CHUNK:
                close()
            span = (embeddings or {}).get(token, 1)
            if span > CHUNK - len(tokens) and span <= CHUNK:
                close()
            span = min(span, CHUNK - len(tokens))  # longer than a chunk: split as words
            tokens.extend(ids[position:position + span])
            weights.extend([weight] * len(ids[position:position + span]))
            position += span
    if tokens or not chunks:
        close()
    return chunks


def tokenize_prompt(tokenizer, text: str, *, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of one prompt: emphasis parsed, each run tokenized on its own (as the WebUI)."""
    runs = parse_emphasis(text)
    ids = tokenizer([t for t, _ in runs], add_special_tokens=False, truncation=False,
                    verbose=False)["input_ids"]
    comma = tokenizer.get_vocab().get(",</w>")
    return build_chunks([None if is_break(run) else (tokens, run[1])
                         for run, tokens in zip(runs, ids, strict=True)],
                        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, comma=comma,
                        backtrack=backtrack, embeddings=embedding_spans(tokenizer))


def embedding_spans(tokenizer) -> dict[int, int]:
    """The first token id of each embedding the tokenizer was taught -> its vector count."""
    return {tokenizer.added_tokens_encoder[token]: n
            for token, n in vector_counts(tokenizer).items()}


def empty_chunk(tokenizer) -> Chunk:
    """The chunk of an empty prompt, used to pad shorter prompts of a batch."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return Chunk((bos, *[eos] * (CHUNK + 1)), (1.0,) * (CHUNK + 2))


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The WebUI's "Original" emphasis: scale each token's embedding, then restore the mean
    of the whole batch (one chunk of each text). sdbatch's batches are the WebUI's: the
    texts of one prompt's schedule, so an image never depends on another's prompt."""
    if bool((weights == 1).all()):
        return z
    original = z.mean()
    z = z * weights.to(z.dtype).unsqueeze(-1)
    return z * (original / z.mean())


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """transformers 5's CLIPTextModel holds it directly; transformers 4 under .text_model."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def hidden_states(text_encoder, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The text encoder's output with clip skip: N > 1 is hidden_states[-N] + final layer norm."""
    if clip_skip <= 1:
        return text_encoder(input_ids=ids).last_hidden_state
    states = text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
    if clip_skip > len(states):
        raise ValueError(f"clip skip {clip_skip} is more than this text encoder's "
                         f"{len(states) - 1} layers")
    return final_layer_norm(text_encoder)(states[-clip_skip])


def chunk_batches(tokenizer, prompts: Sequence[str], *, backtrack: int = COMMA_BACKTRACK
                  ) -> list[list[Chunk]]:
    """Chunk i of every prompt, for i up to the longest prompt; shorter ones get empty chunks.

    The WebUI encodes a batch chunk by chunk this way, so a batch is one tensor.
    """
    per_prompt = [tokenize_prompt(tokenizer, p, backtrack=backtrack) for p in prompts]
    empty = empty_chunk(tokenizer)
    count = max(len(chunks) for chunks in per_prompt)
    return [[c[i] if i < len(c) else empty for c in per_prompt] for i in range(count)]


def chunk_ids(chunks: Sequence[Chunk], *, eos: int, pad: int) -> torch.Tensor:
    """(batch, 77) token ids. Where the pad token is not EOS (OpenCLIP: "!"), everything
    after the first EOS becomes the pad token, as the WebUI does for SD2 and SDXL."""
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
    if pad != eos:
        for row, chunk in zip(ids, chunks, strict=True):
            row[chunk.tokens.index(eos) + 1:] = pad
    return ids


def _special_ids(tokenizer) -> dict[str, int]:
    eos = tokenizer.eos_token_id
    return {"eos": eos, "pad": eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id}


def _weights(chunks: Sequence[Chunk], device) -> torch.Tensor:
    return torch.tensor([c.weights for c in chunks], device=device)


@torch.no_grad()
def encode_chunks(text_encoder, chunks: Sequence[Chunk], clip_skip: int, device: torch.device,
                  *, eos: int, pad: int) -> torch.Tensor:
    """Encode one chunk per prompt -> (batch, 77, dim), emphasis applied."""
    z = hidden_states(text_encoder, chunk_ids(chunks, eos=eos, pad=pad).to(device), clip_skip)
    return apply_emphasis(z, _weights(chunks, z.device))


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], clip_skip: int,
                   device: torch.device, *, backtrack: int = COMMA_BACKTRACK) -> torch.Tensor:
    """Prompts -> (batch, 77 * chunks, dim); shorter prompts are padded with empty-prompt chunks.

    Extra-network tags (<lora:...>) and prompt editing must be resolved before this call:
    it encodes the text it is given.
    """
    special = _special_ids(tokenizer)
    return torch.cat([encode_chunks(text_encoder, batch, clip_skip, device, **special)
                      for batch in chunk_batches(tokenizer, prompts, backtrack=backtrack)], dim=1)


@torch.no_grad()
def encode_prompts_sdxl(tokenizers, text_encoders, prompts: Sequence[str],
                        device: torch.device, *, backtrack: int = COMMA_BACKTRACK
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (both encoders' chunked hidden states side by side, pooled embedding).

    SDXL was trained on the penultimate layer of both encoders with no final layer norm,
    which is what it gets whatever the clip skip: the WebUI ignores clip skip for SDXL
    (unless a setting applies it to CLIP-L, off by default). Each encoder chunks and weights
    the prompt on its own, as the WebUI's two wrapped embedders do; the pooled embedding is
    the last encoder's projection of the end token of the first chunk, unweighted, as in
    the WebUI.
    """
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        special, zs = _special_ids(tokenizer), []
        for i, batch in enumerate(chunk_batches(tokenizer, prompts, backtrack=backtrack)):
            ids = chunk_ids(batch, **special).to(device)
            out = text_encoder(input_ids=ids, output_hidden_states=True)
            zs.append(apply_emphasis(out.hidden_states[-2], _weights(batch, ids.device)))
            if i == 0:
                pooled = getattr(out, "text_embeds", None)
        hidden.append(torch.cat(zs, dim=1))
    if len({h.shape[1] for h in hidden}) != 1:
        raise ValueError("SDXL's two tokenizers cut this prompt into different chunk counts")
    return torch.cat(hidden, dim=-1), pooled


def match_chunks(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of cond/uncond with copies of the encoded empty prompt.

    The pipeline needs both of one length; this is the WebUI's "pad prompt/negative prompt"
    way (sd_samplers_cfg_denoiser.pad_cond_uncond). `empty` is encode_prompts([""]),
    shaped (77, dim) or (1, 77, dim).
    """
    empty = empty.reshape(-1, empty.shape[-1])
    missing = (cond.shape[1] - uncond.shape[1]) // empty.shape[0]

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:
        extra = empty.to(t.device, t.dtype).repeat(n, 1).expand(t.shape[0], -1, -1)
        return torch.cat([t, extra], dim=1)

    if missing > 0:
        uncond = pad(uncond, missing)
    elif missing < 0:
        cond = pad(cond, -missing)
    return cond, uncond


def encode_pair(tokenizer, text_encoder, prompts: Sequence[str], negatives: Sequence[str],
                clip_skip: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond for a batch, encoded separately and padded to the same length."""
    cond = encode_prompts(tokenizer, text_encoder, prompts, clip_skip, device)
    uncond = encode_prompts(tokenizer, text_encoder, negatives, clip_skip, device)
    if cond.shape[1] != uncond.shape[1]:
        empty = encode_prompts(tokenizer, text_encoder, [""], clip_skip, device)
        cond, uncond = match_chunks(cond, uncond, empty)
    return cond, uncond
