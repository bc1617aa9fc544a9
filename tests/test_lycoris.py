"""LyCORIS and DoRA files (LoCon, LoHa, LoKr, IA3, full, norm, GLoRA, OFT, BOFT, DoRA) on the
tiny model and a
tiny SDXL. Every file is written here, key by key as LyCORIS writes them (not by sdbatch's
writer), and every expected delta is the format's maths by hand."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from sdbatch.matrix import Render
from sdbatch.models import lora, lycoris
from sdbatch.models.networks_errors import NetworkError
from sdbatch.stages import txt2img

from .conftest import build_tiny_sdxl

Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 128x128
C = "lora_unet_mid_block_resnets_0_conv1"  # Conv2d 128x128x3x3
T = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # Linear 64x64
N = "lora_unet_mid_block_resnets_0_norm1"  # GroupNorm 128
R, ALPHA = 4, 2.0  # rank and alpha: scale 0.5 where the format has a rank


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stack(tiny_spec):
    from sdbatch.models.stack import load

    return load(tiny_spec, torch.device("cpu"))


def render(stack):
    r = Render(0, 0, "tiny", "a red house", "blurry", "Euler", "Automatic", 2, 7.0, 11, 64, 64, 1)
    return np.asarray(txt2img.run(stack, (r,))[0].image).astype(np.int16)


@pytest.fixture(scope="module")
def base(stack):
    return render(stack)


@pytest.fixture(scope="module")
def table(stack):
    return lora.kohya_modules(stack.pipe, norms=True)


def rnd(gen, *shape, s=0.3):
    return torch.randn(*shape, generator=gen) * s


def cp(t, a, b):
    """A CP (Tucker) rebuild by hand: out[p, q] = sum_ij t[i, j] a[i, p] b[j, q]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, a, b)


def lora_module(gen, w, s=0.3):
    """lora_down/lora_up for any Linear or Conv2d (a k x k down, a 1x1 up), as LoCon writes."""
    down = rnd(gen, R, *w.shape[1:], s=s)
    up = rnd(gen, w.shape[0], R, *([1, 1] if w.ndim == 4 else []), s=s)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(ALPHA)}


def write(path, modules: dict[str, dict[str, torch.Tensor]]):
    safetensors.torch.save_file({f"{m}.{k}": v.contiguous() for m, parts in modules.items()
                                 for k, v in parts.items()}, str(path))
    return path


# each format: its modules, the layer whose delta is checked, the expected (weight, bias) delta
def f_locon(g, tb):
    m = {n: lora_module(g, tb[n].weight) for n in (Q, C, T)}
    up, down = m[C]["lora_up.weight"], m[C]["lora_down.weight"]
    return m, C, lambda w: (torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * ALPHA / R, None)


def f_locon_cp(g, tb):
    m = {n: lora_module(g, tb[n].weight) for n in (Q, T)}
    m[C] = {"lora_down.weight": rnd(g, R, 128, 1, 1), "lora_mid.weight": rnd(g, R, R, 3, 3),
            "lora_up.weight": rnd(g, 128, R, 1, 1), "alpha": torch.tensor(ALPHA)}
    p = m[C]
    up, down = p["lora_up.weight"][:, :, 0, 0], p["lora_down.weight"][:, :, 0, 0]
    return m, C, lambda w: (cp(p["lora_mid.weight"], up.T, down) * ALPHA / R, None)


def loha(g, w):
    out, inner = w.shape[0], w[0].numel()
    return {"hada_w1_a": rnd(g, out, R), "hada_w1_b": rnd(g, R, inner),
            "hada_w2_a": rnd(g, out, R), "hada_w2_b": rnd(g, R, inner),
            "alpha": torch.tensor(ALPHA)}


def f_loha(g, tb):
    m = {n: loha(g, tb[n].weight) for n in (Q, C, T)}
    p = m[Q]
    return m, Q, lambda w: ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
                            * ALPHA / R, None)


def f_loha_cp(g, tb):
    m = {n: loha(g, tb[n].weight) for n in (Q, T)}
    p = m[C] = {"alpha": torch.tensor(ALPHA)}
    for i in "12":
        p.update({f"hada_w{i}_a": rnd(g, R, 128), f"hada_w{i}_b": rnd(g, R, 128),
                  f"hada_t{i}": rnd(g, R, R, 3, 3)})
    return m, C, lambda w: (cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                            * cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]) * ALPHA / R, None)


def f_lokr(g, tb):  # whole w1 and w2: the WebUI scales by 1, whatever alpha says
    m = {Q: {"lokr_w1": rnd(g, 8, 8), "lokr_w2": rnd(g, 16, 16, s=0.05),
             "alpha": torch.tensor(ALPHA)},
         T: {"lokr_w1": rnd(g, 4, 4), "lokr_w2": rnd(g, 16, 16, s=0.05)}}
    return m, Q, lambda w: (torch.kron(m[Q]["lokr_w1"], m[Q]["lokr_w2"]), None)


def f_lokr_factorised(g, tb):
    m = {Q: {"lokr_w1_a": rnd(g, 8, R), "lokr_w1_b": rnd(g, R, 8), "lokr_w2_a": rnd(g, 16, R),
             "lokr_w2_b": rnd(g, R, 16), "alpha": torch.tensor(ALPHA)}}
    p = m[Q]
    return m, Q, lambda w: (torch.kron(p["lokr_w1_a"] @ p["lokr_w1_b"],
                                       p["lokr_w2_a"] @ p["lokr_w2_b"]) * ALPHA / R, None)


def f_lokr_cp(g, tb):
    m = {C: {"lokr_w1": rnd(g, 8, 8), "lokr_w2_a": rnd(g, R, 16), "lokr_w2_b": rnd(g, R, 16),
             "lokr_t2": rnd(g, R, R, 3, 3, s=0.1), "alpha": torch.tensor(ALPHA)}}
    p = m[C]
    w2 = cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]).contiguous()
    return m, C, lambda w: (torch.kron(p["lokr_w1"][:, :, None, None], w2) * ALPHA / R, None)


def f_ia3(g, tb):
    m = {Q: {"weight": rnd(g, 128, s=1.0), "on_input": torch.tensor(False)},
         T: {"weight": rnd(g, 64, s=1.0), "on_input": torch.tensor(True)}}
    return m, Q, lambda w: (w * m[Q]["weight"][:, None], None)


def f_full(g, tb):
    m = {C: {"diff": rnd(g, 128, 128, 3, 3, s=0.02), "diff_b": rnd(g, 128)},
         T: {"diff": rnd(g, 64, 64, s=0.1)}}
    return m, C, lambda w: (m[C]["diff"], m[C]["diff_b"])


def f_norm(g, tb):
    m = {N: {"w_norm": rnd(g, 128), "b_norm": rnd(g, 128)}}
    return m, N, lambda w: (m[N]["w_norm"], m[N]["b_norm"])


def f_dora(g, tb):
    m = {n: lora_module(g, tb[n].weight) for n in (Q, T)}
    p = m[Q]
    p["dora_scale"] = tb[Q].weight.detach().norm(dim=0, keepdim=True) * (1 + rnd(g, 1, 128))

    def expected(w):  # the WebUI: the merged weight's columns rescaled to dora_scale, less w
        merged = w + p["lora_up.weight"] @ p["lora_down.weight"] * ALPHA / R
        return merged * p["dora_scale"] / merged.norm(dim=0, keepdim=True) - w, None
    return m, Q, expected


def glora(g, w):
    out, inner = w.shape
    return {"a1.weight": rnd(g, R, inner, s=0.1), "a2.weight": rnd(g, inner, R, s=0.1),
            "b1.weight": rnd(g, R, inner, s=0.1), "b2.weight": rnd(g, out, R, s=0.1),
            "alpha": torch.tensor(ALPHA)}


def f_glora(g, tb):  # the WebUI gives GLoRA no rank for alpha: scale 1
    m = {n: glora(g, tb[n].weight) for n in (Q, T)}
    p = m[Q]
    return m, Q, lambda w: (p["b2.weight"] @ p["b1.weight"]
                            + w @ p["a2.weight"] @ p["a1.weight"], None)


def cayley(blocks, cap=None):
    """Orthogonal blocks from stored ones by hand: Q = B - B^T, its norm capped, then
    (I + Q)(I - Q)^-1, solved rather than inverted."""
    q = blocks - blocks.transpose(-1, -2)
    if cap is not None:
        norm = q.norm()
        q = q * ((torch.clamp(norm, max=cap) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1]).expand_as(q)
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)
                              ).transpose(-1, -2)


def turned_rows(turns, w):
    """OFT by hand: the rows, block by block, times each block's transpose."""
    return (torch.block_diag(*turns).T @ w.reshape(w.shape[0], -1)).reshape(w.shape)


def f_oft(g, tb):  # kohya's OFT: alpha caps the norm of the skew parts at alpha x out
    m = {Q: {"oft_blocks": rnd(g, 4, 32, 32, s=0.05), "alpha": torch.tensor(1e-3)},
         T: {"oft_blocks": rnd(g, 4, 16, 16, s=0.05)}}
    p = m[Q]
    assert (p["oft_blocks"] - p["oft_blocks"].transpose(1, 2)).norm() > 1e-3 * 128  # capped
    return m, Q, lambda w: (turned_rows(cayley(p["oft_blocks"], 1e-3 * 128), w) - w, None)


def f_oft_diag(g, tb):  # an old LyCORIS OFT, on a convolution: the blocks are stored ready
    m = {C: {"oft_diag": torch.eye(32) + rnd(g, 4, 32, 32, s=0.02)}}
    return m, C, lambda w: (turned_rows(m[C]["oft_diag"], w) - w, None)


def f_boft(g, tb):
    """BOFT: stage i pairs the rows 2^i x 8 apart (blocks of 16), turns each block, and puts
    the rows back; then rescale. The pairing is built here index by index."""
    m = {Q: {"oft_blocks": rnd(g, 2, 8, 16, 16, s=0.05), "rescale": 1 + rnd(g, 128, 1, s=0.1)}}
    p = m[Q]

    def expected(w):
        x = w
        for i, turns in enumerate(cayley(p["oft_blocks"])):
            k = 2 ** i * 8
            order = [c * 2 * k + half * k + j for c in range(128 // (2 * k)) for j in range(k)
                     for half in range(2)]
            shuffle = torch.eye(128)[order]
            x = shuffle.T @ torch.block_diag(*turns) @ shuffle @ x
        return p["rescale"] * x - w, None
    return m, Q, expected


FORMATS = {"locon": f_locon, "locon_cp": f_locon_cp, "loha": f_loha, "loha_cp": f_loha_cp,
           "lokr": f_lokr, "lokr_factorised": f_lokr_factorised, "lokr_cp": f_lokr_cp,
           "ia3": f_ia3, "full": f_full, "norm": f_norm, "dora": f_dora, "glora": f_glora,
           "oft": f_oft, "oft_diag": f_oft_diag, "boft": f_boft}


def test_module_kinds_as_the_webui_tells_them():
    kind = lycoris.module_kind
    assert kind({"lora_up.weight", "lora_down.weight", "alpha"}) == "lora"
    assert lycoris.is_plain_lora({"lora_up.weight", "lora_down.weight", "alpha"})
    assert not lycoris.is_plain_lora({"lora_up.weight", "lora_down.weight", "dora_scale"})
    assert not lycoris.is_plain_lora({"lora_up.weight", "lora_down.weight", "lora_mid.weight"})
    assert kind({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}) \
        == "loha"
    assert kind({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}) == "lokr"
    assert kind({"weight", "on_input"}) == "ia3"
    assert kind({"diff", "diff_b"}) == "full"
    assert kind({"w_norm", "b_norm"}) == "norm"
    assert kind({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}) == "glora"
    assert kind({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}) is None  # the WebUI's
    assert kind({"oft_blocks", "alpha"}) == kind({"oft_diag"}) == "oft"
    assert kind({"oft_blocks", "rescale"}) == "oft"
    assert kind({"hada_w1_a", "hada_w1_b"}) is None  # half a LoHa
    assert kind({"lora_up.weight", "lora_down.weight", "oft_diag"}) is None


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_weight_zero_one_and_its_maths(fmt, stack, base, table, tmp_path):
    gen = torch.Generator().manual_seed(len(fmt))
    modules, checked, expected = FORMATS[fmt](gen, table)
    path = write(tmp_path / f"{fmt}.safetensors", modules)
    layer = table[checked]
    w0 = layer.weight.detach().clone()
    b0 = torch.zeros(0) if layer.bias is None else layer.bias.detach().clone()
    bias = (lambda: torch.zeros(0)) if layer.bias is None else (lambda: layer.bias)
    want_w, want_b = expected(w0)
    s = lora.LoraSet(stack.pipe)
    try:
        s.apply([(path, 0.0)])
        assert np.array_equal(render(stack), base)  # loaded, at 0: bit for bit the same
        s.apply([(path, 1.0)])
        assert np.abs(render(stack) - base).max() > 0
        for weight in (1.0, 0.5):  # fused, so a peft-loaded LoCon shows its delta too
            s.apply([(path, weight)], fuse=True)
            torch.testing.assert_close(layer.weight - w0, weight * want_w.reshape(w0.shape),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(bias() - b0, torch.zeros_like(b0) if want_b is None
                                       else weight * want_b, rtol=1e-4, atol=1e-5)
    finally:
        s.apply([])
    assert torch.equal(layer.weight, w0) and torch.equal(bias(), b0)


def test_webui_dora_axis_and_lycoris_per_output_dora():
    """The WebUI normalises a (1, in) dora_scale per input column; a LyCORIS (out, 1) one
    per output row (the WebUI would broadcast it against column norms)."""
    gen = torch.Generator().manual_seed(0)
    w, up = rnd(gen, 6, 4), rnd(gen, 6, 4)
    cols, rows = torch.rand(1, 4, generator=gen) + 1, torch.rand(6, 1, generator=gen) + 1
    merged = w + up
    torch.testing.assert_close(lycoris.weight_decompose(up, w, cols),
                               merged * cols / merged.norm(dim=0, keepdim=True) - w)
    torch.testing.assert_close(lycoris.weight_decompose(up, w, rows),
                               merged * rows / merged.norm(dim=1, keepdim=True) - w)


def test_lycoris_and_plain_lora_together_fuse_and_unfuse(stack, base, table, tmp_path):
    gen = torch.Generator().manual_seed(7)
    loha_file = write(tmp_path / "h.safetensors", f_loha(gen, table)[0])
    plain = lora.write_kohya_lora(tmp_path / "p.safetensors", stack.pipe.unet,
                                  stack.pipe.text_encoder, seed=5)
    s = lora.LoraSet(stack.pipe)
    try:
        s.apply([(loha_file, 0.8), (plain, 1.0)])
        unfused = render(stack)
        assert np.abs(unfused - base).max() > 0
        s.apply([(loha_file, 0.8), (plain, 1.0)], fuse=True)
        assert np.abs(render(stack) - unfused).max() <= 1
        s.apply([(loha_file, 0.0), (plain, 0.0)], fuse=True)
        assert np.array_equal(render(stack), base)
    finally:
        s.apply([])


def full_locon(table, names, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: lora_module(gen, table[n].weight, s=0.05) for n in names}


BEYOND = ["conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2",
          "down_blocks_0_downsamplers_0_conv", "up_blocks_0_upsamplers_0_conv"]


def test_locon_beyond_attention_and_resnets_is_placed(stack, table, tmp_path):
    """LyCORIS's presets train conv_in, conv_out, the time embedding and the samplers too."""
    names = [f"lora_unet_{n}" for n in BEYOND] + [C, Q, T]
    path = write(tmp_path / "locon_full.safetensors", full_locon(table, names))
    lora.check_lora(path, stack.pipe)
    before = {n: table[n].weight.detach().clone() for n in names}
    s = lora.LoraSet(stack.pipe)
    try:
        s.apply([(path, 1.0)], fuse=True)
        assert [n for n in names if torch.equal(table[n].weight, before[n])] == []
    finally:
        s.apply([])
    assert all(torch.equal(table[n].weight, before[n]) for n in names)


def test_unknown_layout_is_refused_naming_its_keys(stack, table, tmp_path):
    gen = torch.Generator().manual_seed(1)
    modules = full_locon(table, [Q])
    modules[C] = {"hada_w1_a": rnd(gen, R, 128), "hada_w1_b": rnd(gen, R, 128)}  # half a LoHa
    path = write(tmp_path / "half.safetensors", modules)
    s = lora.LoraSet(stack.pipe)
    before = dict(s.adapters)
    with pytest.raises(NetworkError, match=r"half\.safetensors: 2 key\(s\) in no layout .*"
                                           r"conv1\.hada_w1_a.*conv1\.hada_w1_b.*BOFT"):
        s.apply([(path, 1.0)])
    assert s.adapters == before
    bad = write(tmp_path / "wide.safetensors", {Q: loha(gen, torch.zeros(96, 96))})
    with pytest.raises(NetworkError, match=r"wide\.safetensors: 1 module\(s\) do not fit.*LoHa"):
        lora.check_lora(bad, stack.pipe)
    for name, module in (("glora_conv", {C: glora(gen, torch.zeros(128, 128))}),  # Linear only
                         ("oft_blocks", {Q: {"oft_blocks": rnd(gen, 3, 32, 32)}}),  # 96 rows
                         ("boft_pairs", {Q: {"oft_blocks": rnd(gen, 5, 8, 16, 16)}})):
        bad = write(tmp_path / f"{name}.safetensors", module)
        with pytest.raises(NetworkError, match=rf"{name}\.safetensors: 1 module\(s\) do not fit"):
            lora.check_lora(bad, stack.pipe)


def test_a_weight_dependent_delta_is_taken_against_the_layers_own_weight(stack, table,
                                                                        tmp_path):
    """OFT turns the layer's weight: loaded while another file is merged into that layer, it
    must still turn the model's own weight, as the WebUI's (restored first) does."""
    gen = torch.Generator().manual_seed(3)
    full = write(tmp_path / "full.safetensors", {Q: {"diff": rnd(gen, 128, 128, s=0.05)}})
    oft_modules, _, expected = f_oft(gen, table)
    oft = write(tmp_path / "oft.safetensors", oft_modules)
    layer = table[Q]
    w0 = layer.weight.detach().clone()
    s = lora.LoraSet(stack.pipe)
    try:
        s.apply([(full, 1.0)])
        s.apply([(full, 1.0), (oft, 1.0)])
        want = w0 + oft_modules_diff(full) + expected(w0)[0]
        torch.testing.assert_close(layer.weight, want, rtol=1e-4, atol=1e-5)
    finally:
        s.apply([])
    assert torch.equal(layer.weight, w0)


def oft_modules_diff(path):
    return safetensors.torch.load_file(str(path))[f"{Q}.diff"]


# ---- SDXL ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


SGM = ["input_blocks_0_0", "out_2", "time_embed_0", "time_embed_2", "label_emb_0_0",
       "input_blocks_3_0_op", "output_blocks_2_2_conv", "input_blocks_1_0_in_layers_2",
       "input_blocks_4_1_transformer_blocks_1_attn2_to_k"]
TE = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
      "lora_te2_text_model_encoder_layers_2_mlp_fc1"]


def sdxl_text(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt("a red house", do_classifier_free_guidance=False)
    return embeds, pooled


@pytest.mark.parametrize("fmt", ["locon", "loha"])
def test_sdxl_sgm_names_and_both_text_encoders(fmt, sdxl_pipe, tmp_path):
    pipe = sdxl_pipe
    table = lora.kohya_modules(pipe, norms=True)
    names = [f"lora_unet_{n}" for n in SGM] + TE
    gen = torch.Generator().manual_seed(3)
    modules = (full_locon(table, names) if fmt == "locon"
               else {n: loha(gen, table[n].weight) for n in names})
    path = write(tmp_path / f"xl_{fmt}.safetensors", modules)
    before = {n: table[n].weight.detach().clone() for n in names}
    text = sdxl_text(pipe)
    s = lora.LoraSet(pipe)
    try:
        s.apply([(path, 1.0)], fuse=True)
        assert [n for n in names if torch.equal(table[n].weight, before[n])] == []
        after = sdxl_text(pipe)
        assert not torch.equal(text[0][..., :32], after[0][..., :32])  # text encoder 1
        assert not torch.equal(text[1], after[1])  # text encoder 2's pooled output
    finally:
        s.apply([])
    assert all(torch.equal(table[n].weight, before[n]) for n in names)
    assert all(torch.equal(a, b) for a, b in zip(text, sdxl_text(pipe), strict=True))


def test_split_weights_move_only_their_part_of_a_merged_file(stack, table, tmp_path):
    """<lora:name:0:1> on a LoHa (merged as deltas): the text encoder keeps its weights bit
    for bit, the UNet takes the file; (1, 0) the other way round."""
    gen = torch.Generator().manual_seed(3)
    modules, _, _ = f_loha(gen, table)
    path = write(tmp_path / "loha.safetensors", modules)
    te, unet = table[T].weight, table[Q].weight
    te0, unet0 = te.detach().clone(), unet.detach().clone()
    s = lora.LoraSet(stack.pipe)
    try:
        s.apply([(path, (0.0, 1.0))])
        assert torch.equal(te, te0) and not torch.equal(unet, unet0)
        s.apply([(path, (1.0, 0.0))])
        assert not torch.equal(te, te0) and torch.equal(unet, unet0)
    finally:
        s.apply([])
    assert torch.equal(te, te0) and torch.equal(unet, unet0)
