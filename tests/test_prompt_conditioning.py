"""Long-prompt chunking on the real CLIP vocabulary, emphasis maths and clip skip."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdbatch.models.clip_vocab import PAD_OPENCLIP, write_clip_tokenizer  # noqa: E402
from sdbatch.prompts.conditioning import (  # noqa: E402
    Chunk,
    build_chunks,
    empty_chunk,
    encode_chunks,
    encode_pair,
    encode_prompts,
    encode_prompts_sdxl,
    match_chunks,
    tokenize_prompt,
)
from sdbatch.prompts.encode import encode  # noqa: E402

BOS, EOS, COMMA, CAT, DOG, A = 49406, 49407, 267, 2368, 1929, 320
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    return trained_looking(CLIPTextModel(config))


def trained_looking(model):
    """Fresh layer norms output zero-mean tokens, and the WebUI's emphasis divides by the
    mean; trained ones do not, so give them trained-looking parameters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.3, 0.2)
    return model.eval()


def content(chunk: Chunk) -> list[int]:
    """A chunk's prompt tokens: between BOS and the first EOS."""
    assert chunk.tokens[0] == BOS and len(chunk.tokens) == len(chunk.weights) == 77
    return list(chunk.tokens[1:chunk.tokens.index(EOS)])


# ------------------------------------------------------------------------------ chunking


def test_short_prompt_is_one_padded_chunk(tokenizer):
    [chunk] = tokenize_prompt(tokenizer, "a photo of a cat")
    assert chunk.tokens == (BOS, 320, 1125, 539, 320, 2368, *[EOS] * 71)
    assert chunk.weights == (1.0,) * 77


def test_75_tokens_fill_one_chunk_and_the_76th_opens_another(tokenizer):
    [full] = tokenize_prompt(tokenizer, "cat " * 75)
    assert full.tokens == (BOS, *[CAT] * 75, EOS)
    first, second = tokenize_prompt(tokenizer, "cat " * 76)
    assert first.tokens == (BOS, *[CAT] * 75, EOS)
    assert content(second) == [CAT]


def test_chunk_boundary_backs_up_to_a_recent_comma(tokenizer):
    # The comma is token 61 of 81: within 20 of the boundary, so the dogs after it move.
    first, second = tokenize_prompt(tokenizer, "cat " * 60 + ", " + "dog " * 20)
    assert first.tokens == (BOS, *[CAT] * 60, COMMA, *[EOS] * 14, EOS)
    assert content(second) == [DOG] * 20


def test_comma_further_back_than_20_tokens_is_ignored(tokenizer):
    first, second = tokenize_prompt(tokenizer, "cat " * 50 + ", " + "dog " * 30)
    assert first.tokens == (BOS, *[CAT] * 50, COMMA, *[DOG] * 24, EOS)
    assert content(second) == [DOG] * 6
    first, _ = tokenize_prompt(tokenizer, "cat " * 60 + ", " + "dog " * 20, backtrack=0)
    assert content(first) == [CAT] * 60 + [COMMA] + [DOG] * 14  # back-off disabled


def test_long_prompt_loses_and_repeats_no_token(tokenizer):
    text = ", ".join(f"{w} {n}" for n in range(40) for w in ("masterpiece", "red house"))
    chunks = tokenize_prompt(tokenizer, text)
    flat = tokenizer(text, add_special_tokens=False).input_ids
    assert len(flat) > 150 and len(chunks) >= 3
    assert [t for c in chunks for t in content(c)] == flat
    for c in chunks[:-1]:  # every full chunk but the last was cut right after a comma
        assert content(c)[-1] == COMMA


def test_break_pads_the_current_chunk(tokenizer):
    first, second = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    assert first.tokens == (BOS, A, CAT, *[EOS] * 74)
    assert content(second) == [A, DOG]
    assert len(tokenize_prompt(tokenizer, "a cat BREAK")) == 1  # nothing after it: no chunk
    empty, cat = tokenize_prompt(tokenizer, "BREAK cat")  # a leading BREAK: an empty chunk
    assert empty == empty_chunk(tokenizer) and content(cat) == [CAT]
    [inside] = tokenize_prompt(tokenizer, "(a BREAK b)")  # scaled by (): just a word
    assert content(inside) == tokenizer("a break b", add_special_tokens=False).input_ids


def test_weights_follow_their_tokens(tokenizer):
    [chunk] = tokenize_prompt(tokenizer, "a (red house:1.5) [dog]")
    assert content(chunk) == [A, 736, 1212, DOG]
    assert chunk.weights[:6] == (1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0)
    [escaped] = tokenize_prompt(tokenizer, r"\(cat\)")
    assert escaped.weights == (1.0,) * 77


def test_empty_prompt_is_one_empty_chunk(tokenizer):
    assert tokenize_prompt(tokenizer, "") == [empty_chunk(tokenizer)]


def test_build_chunks_comma_at_the_boundary_is_not_remembered():
    # A comma arriving as token 76 opens the next chunk and cannot be backed up to there.
    runs = [([7] * 75 + [COMMA] + [8] * 80, 1.0)]
    chunks = build_chunks(runs, bos=BOS, eos=EOS, comma=COMMA)
    assert [content(c) for c in chunks] == [[7] * 75, [COMMA] + [8] * 74, [8] * 6]


# --------------------------------------------------------------------------- encoding


def test_clip_skip_is_final_layer_norm_of_an_earlier_layer(tokenizer, text_encoder):
    ids = torch.tensor([tokenize_prompt(tokenizer, "a photo of a cat")[0].tokens])
    out = text_encoder(input_ids=ids, output_hidden_states=True)
    skip1 = encode_prompts(tokenizer, text_encoder, ["a photo of a cat"], 1, CPU)
    skip2 = encode_prompts(tokenizer, text_encoder, ["a photo of a cat"], 2, CPU)
    assert skip1.shape == (1, 77, 32)
    torch.testing.assert_close(skip1, out.last_hidden_state)
    torch.testing.assert_close(skip2, text_encoder.final_layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(skip1, skip2)
    with pytest.raises(ValueError, match="clip skip 5"):
        encode_prompts(tokenizer, text_encoder, ["cat"], 5, CPU)


def test_plain_short_prompts_encode_bit_for_bit_as_before(tokenizer, text_encoder):
    # No emphasis and under 76 tokens: the same bytes as a plain padded encoding, so
    # images rendered before the WebUI syntax existed do not change.
    texts = ["a red house", "a photo of a cat, blue sky"]
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = text_encoder(input_ids=ids).last_hidden_state
    assert torch.equal(encode_prompts(tokenizer, text_encoder, texts, 1, CPU), before)


def test_chunks_are_encoded_separately_and_concatenated(tokenizer, text_encoder):
    long = "cat " * 60 + ", " + "dog " * 20
    chunks = tokenize_prompt(tokenizer, long)
    z = encode_prompts(tokenizer, text_encoder, [long, "a cat"], 2, CPU)
    assert z.shape == (2, 154, 32)
    for i, chunk in enumerate(chunks):
        alone = encode_chunks(text_encoder, [chunk], 2, CPU, eos=EOS, pad=EOS)
        torch.testing.assert_close(z[:1, 77 * i:77 * (i + 1)], alone)
    # the shorter prompt is padded with the empty prompt's encoding
    empty = encode_prompts(tokenizer, text_encoder, [""], 2, CPU)
    torch.testing.assert_close(z[1:, 77:], empty)
    torch.testing.assert_close(z[1:, :77], encode_prompts(tokenizer, text_encoder, ["a cat"], 2,
                                                          CPU))


def test_original_emphasis_scales_tokens_and_keeps_the_mean(tokenizer, text_encoder):
    plain = encode_prompts(tokenizer, text_encoder, ["a red cat"], 1, CPU)
    weighted = encode_prompts(tokenizer, text_encoder, ["a (red:1.5) [cat]"], 1, CPU)
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    assert not torch.allclose(weighted, plain)


def test_emphasis_mean_is_the_batchs_as_the_webuis(tokenizer, text_encoder):
    """EmphasisOriginal restores z.mean() of the whole batch: the texts of one prompt's
    schedule ("a (red:1.5) [cat:dog:5]") take one factor, not one each."""
    texts = ["a (red:1.5) cat", "a (red:1.5) dog"]
    both = encode_prompts(tokenizer, text_encoder, texts, 1, CPU)
    plain = encode_prompts(tokenizer, text_encoder, ["a red cat", "a red dog"], 1, CPU)
    weights = torch.ones(77)
    weights[2] = 1.5
    scaled = plain * weights[None, :, None]
    torch.testing.assert_close(both, scaled * (plain.mean() / scaled.mean()))
    alone = encode_prompts(tokenizer, text_encoder, texts[1:], 1, CPU)
    assert not torch.allclose(both[1:], alone)  # the WebUI's factor is the pair's


def test_openclip_pad_token_fills_after_the_first_eos(tmp_path, tokenizer, text_encoder):
    write_clip_tokenizer(tmp_path, PAD_OPENCLIP)
    bang = CLIPTokenizer.from_pretrained(tmp_path)
    with_eos = encode_prompts(tokenizer, text_encoder, ["a photo of a cat"], 1, CPU)
    with_bang = encode_prompts(bang, text_encoder, ["a photo of a cat"], 1, CPU)
    # the encoder is causal: up to the EOS (position 6) nothing changes, after it all does
    torch.testing.assert_close(with_bang[:, :7], with_eos[:, :7])
    assert not torch.allclose(with_bang[:, 7:], with_eos[:, 7:])


def test_match_chunks_pads_the_shorter_side_with_the_empty_prompt(tokenizer, text_encoder):
    empty = encode_prompts(tokenizer, text_encoder, [""], 1, CPU)
    long = encode_prompts(tokenizer, text_encoder, ["cat BREAK dog BREAK a"], 1, CPU)
    short = encode_prompts(tokenizer, text_encoder, ["blurry"], 1, CPU)
    cond, uncond = match_chunks(long, short, empty)
    assert cond is long and uncond.shape == long.shape == (1, 231, 32)
    torch.testing.assert_close(uncond[:, :77], short)
    torch.testing.assert_close(uncond[:, 77:154], empty)
    torch.testing.assert_close(uncond[:, 154:], empty)
    cond, uncond = match_chunks(short, long, empty[0])
    assert cond.shape == uncond.shape and uncond is long
    same = match_chunks(short, short, empty)
    assert same[0] is short and same[1] is short


def test_encode_pair_and_the_old_encode_entry_point(tokenizer, text_encoder):
    cond, uncond = encode_pair(tokenizer, text_encoder, ["cat BREAK dog"], ["blurry"], 2, CPU)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[:, 77:],
                               encode_prompts(tokenizer, text_encoder, [""], 2, CPU))
    torch.testing.assert_close(encode(tokenizer, text_encoder, ["cat BREAK dog"], 2, CPU), cond)


# ---------------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tokenizer, text_encoder):
    """Two encoders as SDXL's: CLIP-L (pad EOS) and a projecting OpenCLIP (pad "!")."""
    folder = tmp_path_factory.mktemp("openclip-tokenizer")
    write_clip_tokenizer(folder, PAD_OPENCLIP)
    torch.manual_seed(1)
    # eos_token_id 2 as in the released SDXL configs: pool at the highest id (the end token)
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
        hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    return (tokenizer, CLIPTokenizer.from_pretrained(folder)), (text_encoder,
                                                                 trained_looking(second))


def test_sdxl_short_prompt_is_both_penultimate_layers_and_the_pooled_end_token(sdxl):
    tokenizers, encoders = sdxl
    text = ["a photo of a cat"]
    embeds, pooled = encode_prompts_sdxl(tokenizers, encoders, text, CPU)
    hidden, outs = [], []
    with torch.no_grad():
        for tok, enc in zip(tokenizers, encoders, strict=True):
            ids = tok(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            outs.append(enc(input_ids=ids, output_hidden_states=True))
            hidden.append(outs[-1].hidden_states[-2])
    assert embeds.shape == (1, 77, 32 + 48) and pooled.shape == (1, 24)
    torch.testing.assert_close(embeds, torch.cat(hidden, dim=-1))
    torch.testing.assert_close(pooled, outs[1].text_embeds)


def test_sdxl_long_prompt_chunks_both_encoders_and_pools_the_first_chunk(sdxl):
    tokenizers, encoders = sdxl
    long = "a (red:1.4) cat, " * 20  # 80 tokens: two chunks
    embeds, pooled = encode_prompts_sdxl(tokenizers, encoders, [long], CPU)
    assert embeds.shape == (1, 154, 80)
    first = tokenize_prompt(tokenizers[1], long)[0]
    ids = torch.tensor([first.tokens])
    ids[0, first.tokens.index(EOS) + 1:] = 0  # OpenCLIP pads with "!"
    with torch.no_grad():
        torch.testing.assert_close(pooled, encoders[1](input_ids=ids).text_embeds)
    # the weights apply to each encoder's part on its own, each keeping its own mean
    plain, _ = encode_prompts_sdxl(tokenizers, encoders, ["a red cat, " * 20], CPU)
    for part in (slice(0, 32), slice(32, 80)):
        for chunk in (slice(0, 77), slice(77, 154)):
            torch.testing.assert_close(embeds[:, chunk, part].mean(),
                                       plain[:, chunk, part].mean())
    assert not torch.allclose(embeds, plain)


def test_an_embedding_that_does_not_fit_the_chunk_starts_the_next():
    """The WebUI never splits an embedding's vectors: 70 words then a 10-vector embedding
    are a chunk of 70 and a chunk that starts with the 10 (ids 500..509)."""
    words = [(list(range(100, 170)), 1.0), ([500, *range(501, 510), 7], 1.2)]
    first, second = build_chunks(words, bos=1, eos=2, comma=None, embeddings={500: 10})
    assert first.tokens[1:71] == tuple(range(100, 170)) and first.tokens[71] == 2
    assert second.tokens[1:12] == (500, *range(501, 510), 7)
    assert second.weights[1:12] == (1.2,) * 11
    whole = build_chunks(words, bos=1, eos=2, comma=None)  # words: split at 75
    assert whole[0].tokens[71:76] == (500, 501, 502, 503, 504)
