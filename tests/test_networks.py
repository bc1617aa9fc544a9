"""Extra networks (LoRA, textual inversion, hypernetworks) on the tiny model, fully offline.

Every file is made by sdbatch's own writers, so the tests need no download. The module has
its own pipeline (networks change it) and one baseline image rendered before anything
is loaded into it.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from sdbatch.matrix import Render
from sdbatch.models import embeddings, hypernetwork, lora
from sdbatch.models.networks_errors import NetworkError
from sdbatch.stages import txt2img

from .conftest import build_tiny_sdxl


def txt2img_images(stack, renders, on_step=None):
    """The pictures of a txt2img batch (the stage hands on pictures with their latents)."""
    return [p.image for p in txt2img.run(stack, renders, on_step)]


def render(stack, prompt="a red house", negative="blurry", seed=11):
    r = Render(0, 0, "tiny", prompt, negative, "Euler", "Automatic", 3, 7.0, seed, 64, 64, 1)
    return np.asarray(txt2img_images(stack, (r,))[0]).astype(np.int16)


def diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stack(tiny_spec):
    from sdbatch.models.stack import load

    return load(tiny_spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def base(stack):
    """The image with no network at all, rendered before any is loaded."""
    return render(stack)


@pytest.fixture(scope="module")
def loras(stack, base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = stack.pipe
    return {
        "a": lora.write_kohya_lora(folder / "a.safetensors", pipe.unet, pipe.text_encoder, seed=1),
        "b": lora.write_kohya_lora(folder / "b.safetensors", pipe.unet, pipe.text_encoder, seed=2),
        "unet_only": lora.write_kohya_lora(folder / "u.safetensors", pipe.unet, None, seed=3),
    }


@pytest.fixture(scope="module")
def lora_set(stack, base):
    s = lora.LoraSet(stack.pipe)
    yield s
    s.apply([])


# ---- LoRA ------------------------------------------------------------------------------------

def after_header_sha256(path) -> str:
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + size:]).hexdigest()


def test_lora_hash_is_the_webui_value(loras, tmp_path):
    import safetensors.torch

    path = loras["a"]
    assert lora.lora_hash(path) == after_header_sha256(path)[:12]
    tensors = safetensors.torch.load_file(str(path))
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(tensors, str(bare), {"ss_output_name": "something else"})
    assert lora.lora_hash(bare) == lora.lora_hash(path)  # metadata does not change it
    assert lora.lora_hash(bare) != hashlib.sha256(bare.read_bytes()).hexdigest()[:12]
    tagged = tmp_path / "tagged.safetensors"
    safetensors.torch.save_file(tensors, str(tagged), {"sshs_model_hash": "0123456789abcdef"})
    assert lora.lora_hash(tagged) == "0123456789ab"


def test_kohya_writer_is_deterministic_and_kohya_shaped(stack, loras, tmp_path):
    pipe = stack.pipe
    again = lora.write_kohya_lora(tmp_path / "a.safetensors", pipe.unet, pipe.text_encoder, seed=1)
    assert again.read_bytes() == loras["a"].read_bytes()
    shapes, metadata = lora.read_safetensors_header(again)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in shapes
    assert ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
            in shapes)
    width = pipe.unet.config.block_out_channels[-1]  # the mid block's channels; conv-shaped
    assert shapes["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"] == (width, 4, 1, 1)
    assert metadata["sshs_model_hash"] == after_header_sha256(again)
    unet_only = lora.read_safetensors_header(loras["unet_only"])[0]
    assert all(k.startswith("lora_unet_") for k in unet_only)


def test_lora_weight_zero_is_no_lora_and_weight_one_changes_the_image(stack, base, loras,
                                                                      lora_set):
    lora_set.apply([(loras["a"], 0.0)])
    assert diff(render(stack), base) == 0
    lora_set.apply([(loras["a"], 1.0)])
    one = render(stack)
    assert diff(one, base) > 10
    lora_set.apply([(loras["a"], 0.5)])
    half = render(stack)
    assert diff(half, base) > 0 and diff(half, one) > 0
    lora_set.apply([])
    assert diff(render(stack), base) == 0  # adapters disabled: exactly the base model
    lora_set.apply([(loras["a"], 1.0)])
    assert diff(render(stack), one) == 0  # the same weight again gives the same image


def test_two_loras_at_once(stack, base, loras, lora_set):
    lora_set.apply([(loras["a"], 1.0)])
    a = render(stack)
    lora_set.apply([(loras["b"], 1.0)])
    b = render(stack)
    lora_set.apply([(loras["a"], 1.0), (loras["b"], 1.0)])
    both = render(stack)
    assert min(diff(both, a), diff(both, b), diff(both, base)) > 0
    lora_set.apply([(loras["a"], 0.5), (loras["a"], 0.5), (loras["b"], 0.0)])
    assert diff(render(stack), a) <= 1  # a file named twice adds its weights, as in the WebUI
    lora_set.apply([])
    assert diff(render(stack), base) == 0


def test_an_axis_over_many_loras_keeps_only_a_few_loaded(stack, base, loras, tmp_path,
                                                         monkeypatch):
    """Each file of a LoRA axis is loaded when asked for; beyond KEEP_UNUSED unused ones the
    least recently used goes (adapters lived on the GPU until the stack went), and one asked
    for again loads again to the same image."""
    monkeypatch.setattr(lora, "KEEP_UNUSED", 1)
    pipe = stack.pipe
    files = [lora.write_kohya_lora(tmp_path / f"x{i}.safetensors", pipe.unet,
                                   pipe.text_encoder, seed=10 + i) for i in range(4)]
    s = lora.LoraSet(pipe)
    try:
        s.apply([(files[0], 1.0)])
        first = render(stack)
        for f in files[1:]:
            s.apply([(f, 1.0)])
            assert len(s.adapters) <= 2  # the one in use and one unused
        loaded = {n for names in pipe.get_list_adapters().values() for n in names}
        assert len(loaded) <= 2 and set(s.adapters.values()) == loaded
        s.apply([(files[0], 1.0)])
        assert diff(render(stack), first) == 0
    finally:
        s.apply([])
    assert diff(render(stack), base) == 0


def test_unet_only_lora_leaves_the_text_encoder_alone(stack, loras, lora_set):
    from sdbatch.prompts.encode import encode

    pipe = stack.pipe

    def text():
        return encode(pipe.tokenizer, pipe.text_encoder, ["a red house"], 1, stack.device)

    lora_set.apply([])
    plain = text()
    lora_set.apply([(loras["unet_only"], 1.0)])
    assert torch.equal(text(), plain)
    lora_set.apply([(loras["a"], 1.0)])
    assert not torch.equal(text(), plain)
    lora_set.apply([])


def one_part(path, prefix: str, out):
    """The LoRA with only one part's keys (lora_te_ or lora_unet_): that part alone."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file({k: v for k, v in tensors.items() if k.startswith(prefix)},
                                str(out))
    return out


def text_out(stack):
    from sdbatch.prompts.encode import encode

    pipe = stack.pipe
    return encode(pipe.tokenizer, pipe.text_encoder, ["a red house"], 1, stack.device)


@torch.no_grad()
def unet_out(pipe):
    """The UNet's prediction for a fixed latent, timestep and context: its text input and
    so the text encoder play no part."""
    gen = torch.Generator("cpu").manual_seed(5)
    latent = torch.randn((1, pipe.unet.config.in_channels, 8, 8), generator=gen)
    context = torch.randn((1, 77, pipe.unet.config.cross_attention_dim), generator=gen)
    return pipe.unet(latent, 500, encoder_hidden_states=context).sample


def test_split_weights_act_only_on_their_part(stack, base, loras, lora_set, tmp_path):
    te_only = one_part(loras["a"], "lora_te_", tmp_path / "te_only.safetensors")
    unet_only = one_part(loras["a"], "lora_unet_", tmp_path / "unet_only.safetensors")
    lora_set.apply([])
    plain_text, plain_unet = text_out(stack), unet_out(stack.pipe)

    lora_set.apply([(loras["a"], (0.0, 1.0))])  # <lora:a:0:1>
    assert torch.equal(text_out(stack), plain_text)  # the text encoder bit for bit
    assert not torch.equal(unet_out(stack.pipe), plain_unet)
    unet_part = render(stack)
    lora_set.apply([(unet_only, 1.0)])
    assert diff(render(stack), unet_part) == 0  # exactly the LoRA without its te part

    lora_set.apply([(loras["a"], (1.0, 0.0))])  # <lora:a:1:0>
    assert torch.equal(unet_out(stack.pipe), plain_unet)  # the UNet untouched
    assert not torch.equal(text_out(stack), plain_text)
    te_part = render(stack)
    lora_set.apply([(te_only, 1.0)])
    assert diff(render(stack), te_part) == 0
    assert min(diff(te_part, base), diff(unet_part, base), diff(te_part, unet_part)) > 0

    lora_set.apply([(loras["a"], 0.6)])
    whole = render(stack)
    lora_set.apply([(loras["a"], (0.6, 0.6))])
    assert diff(render(stack), whole) == 0  # one weight is both parts'
    lora_set.apply([(loras["a"], (0.3, 0.0)), (loras["a"], (0.3, 0.6))])
    assert diff(render(stack), whole) <= 1  # named twice: each part adds up
    lora_set.apply([])


def test_fused_split_weights_fuse_only_their_part(stack, loras, lora_set):
    pipe = stack.pipe

    def own(model):
        return {n.replace(".base_layer", ""): p.detach().clone()
                for n, p in model.named_parameters() if "lora_" not in n}

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    unet, te = own(pipe.unet), own(pipe.text_encoder)
    for weight in ((1.0, 0.0), (0.0, 1.0)):
        lora_set.apply([(loras["a"], weight)])
        unfused = render(stack)
        lora_set.apply([(loras["a"], weight)], fuse=True)
        assert same(own(pipe.unet), unet) == (weight[1] == 0)
        assert same(own(pipe.text_encoder), te) == (weight[0] == 0)
        assert diff(render(stack), unfused) <= 1
    lora_set.apply([])
    assert same(own(pipe.unet), unet) and same(own(pipe.text_encoder), te)  # unfused exactly


def test_changing_lora_weights_never_reloads_a_model(stack, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdbatch.models import stack as stack_module

    calls: list[str] = []

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    counting(stack_module, "load")
    for cls in (DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel, CLIPTextModel):
        counting(cls, "from_pretrained")
    counting(type(stack.pipe), "load_lora_weights")
    files = [lora.write_kohya_lora(tmp_path / f"{n}.safetensors", stack.pipe.unet,
                                   stack.pipe.text_encoder, seed=n) for n in (21, 22)]
    s = lora.LoraSet(stack.pipe)
    images = []
    for weights in ([1.0, 0.0], [0.3, 0.0], [0.3, 0.8], [0.0, 0.0], [1.0, 0.0]):
        s.apply(list(zip(files, weights, strict=True)))
        lora.LoraSet(stack.pipe).apply(list(zip(files, weights, strict=True)))  # shares state
        images.append(render(stack))
    s.apply([])
    assert [c for c in calls if "load_lora_weights" not in c] == []
    assert calls.count("StableDiffusionPipeline.load_lora_weights") == 2  # once per file
    assert diff(images[0], images[4]) == 0 and diff(images[0], images[1]) > 0


def test_out_of_memory_while_loading_a_lora_is_the_batchs_to_retry(stack, tmp_path,
                                                                   monkeypatch):
    """Not a cue to load it another way (merged deltas: other pixels than the adapter the
    image's reproduce takes): the error reaches the worker's retries, nothing half-loaded."""
    [path] = [lora.write_kohya_lora(tmp_path / "oom.safetensors", stack.pipe.unet,
                                    stack.pipe.text_encoder, seed=31)]

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(stack.pipe), "load_lora_weights", full)
    s = lora.LoraSet(stack.pipe)
    with pytest.raises(torch.OutOfMemoryError):
        s.apply([(path, 1.0)])
    monkeypatch.undo()
    s.apply([])
    assert not any("oom" in str(n) for n in stack.pipe.get_list_adapters().values())


def sdxl_shaped_lora(path, with_text_encoders: bool):
    """A LoRA with SDXL's real key names and shapes (the tensors are tiny, only the shapes
    matter to the check)."""
    import safetensors.torch

    tensors = {}

    def module(name, out_f, in_f):
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, in_f)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(out_f, 4)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)

    module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)
    module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q", 640, 640)
    if with_text_encoders:
        module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
        module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_sdxl_lora_on_sd1_checkpoint_is_refused(stack, tmp_path):
    s = lora.LoraSet(stack.pipe)
    before = dict(s.adapters)
    te = sdxl_shaped_lora(tmp_path / "xl_style.safetensors", with_text_encoders=True)
    with pytest.raises(NetworkError) as err:
        s.apply([(te, 1.0)])
    message = str(err.value)
    assert "xl_style.safetensors" in message and "SDXL" in message
    assert "lora_te1_" in message and "SD1.x" in message and "Use a LoRA made for" in message
    unet_only = sdxl_shaped_lora(tmp_path / "xl_unet.safetensors", with_text_encoders=False)
    with pytest.raises(NetworkError, match=r"xl_unet\.safetensors.*SDXL.*2048.*width 64"):
        lora.check_lora(unet_only, stack.pipe)
    assert s.adapters == before  # refused before anything was loaded
    assert "xl_style" not in str(stack.pipe.get_list_adapters())


def test_lora_that_does_not_fit_the_model_is_refused(stack, tmp_path):
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel(  # same family (context 64), wider attention blocks
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8)
    path = lora.write_kohya_lora(tmp_path / "wide.safetensors", wider, None)
    with pytest.raises(NetworkError, match=r"wide\.safetensors: \d+ module\(s\) do not fit.*"
                                           r"LoRA 96->96, model 128->128"):
        lora.check_lora(path, stack.pipe)
    deeper = UNet2DConditionModel(  # an attention level the tiny model does not have
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8)
    path = lora.write_kohya_lora(tmp_path / "deep.safetensors", deeper, None)
    with pytest.raises(NetworkError, match=r"deep\.safetensors: \d+ of its \d+ modules exist "
                                           "nowhere"):
        lora.check_lora(path, stack.pipe)


def test_incomplete_lycoris_and_non_lora_files_are_refused(stack, tmp_path):
    import safetensors.torch

    loha = tmp_path / "loha.safetensors"  # half a LoHa module: no layout the WebUI knows
    safetensors.torch.save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a":
                                 torch.zeros(4, 64)}, str(loha))
    with pytest.raises(NetworkError, match=r"loha\.safetensors: 1 key\(s\) in no layout.*"
                                           r"proj_in\.hada_w1_a"):
        lora.check_lora(loha, stack.pipe)
    other = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, str(other))
    with pytest.raises(NetworkError, match=r"model\.safetensors: key .* not a kohya"):
        lora.check_lora(other, stack.pipe)
    with pytest.raises(NetworkError, match="no such LoRA file"):
        lora.check_lora(tmp_path / "missing.safetensors", stack.pipe)


def test_tiny_family_ships_a_lora_and_an_embedding(stack):
    from sdbatch.models import tiny

    folder = tiny.family_models()
    lora.check_lora(folder / "Lora" / "LegoAlrev.safetensors", stack.pipe)
    vectors = embeddings.read_embedding(folder / "embeddings" / "nightsky.pt")
    assert vectors["clip_l"].shape[1] == stack.pipe.text_encoder.config.hidden_size


# ---- textual inversion -----------------------------------------------------------------------

def vectors(n, width=64, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_embedding_triggered_by_its_file_stem(stack, base, tmp_path):
    path = embeddings.write_a1111_embedding(tmp_path / "LegoStyle.pt", vectors(3, seed=1))
    plain_trigger = render(stack, "LegoStyle, a red house")
    record = embeddings.load_embedding(stack.pipe, path)
    assert (record.token, record.vectors) == ("LegoStyle", 3)
    assert record.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert embeddings.ti_hash(path) == record.hash
    assert diff(render(stack), base) == 0  # loaded but not in the prompt: no change
    assert diff(render(stack, "LegoStyle, a red house"), plain_trigger) > 0
    assert diff(render(stack, negative="blurry, LegoStyle"), base) > 0
    assert diff(render(stack, "legostyle, a red house"), render(stack, "LegoStyle, a red house")
                ) == 0  # the tokenizer lowercases, as CLIP does in the WebUI
    assert embeddings.load_embedding(stack.pipe, path) == record  # a second load is a no-op


def test_multi_vector_trigger_uses_every_vector(stack, tmp_path):
    path = embeddings.write_a1111_embedding(tmp_path / "ThreeVec.pt", vectors(3, seed=2))
    embeddings.load_embedding(stack.pipe, path)
    tok = stack.pipe.tokenizer
    text = embeddings.expand_triggers(tok, "threevec, a ThreeVec house")
    assert text == "threevec ThreeVec_1 ThreeVec_2, a ThreeVec ThreeVec_1 ThreeVec_2 house"
    ids = tok(text).input_ids
    added = [tok.convert_tokens_to_ids(t) for t in ("ThreeVec", "ThreeVec_1", "ThreeVec_2")]
    assert ids[1:4] == added and len(set(added)) == 3
    rows = stack.pipe.text_encoder.get_input_embeddings().weight[added]
    assert torch.allclose(rows, vectors(3, seed=2))
    assert embeddings.expand_triggers(tok, "a red house") == "a red house"


def test_an_embedding_triggers_on_whole_words_only(stack, tmp_path):
    """The WebUI matches an embedding's name by its tokens: "baddreams" is another word."""
    from sdbatch.prompts.conditioning import embedding_spans, tokenize_prompt

    embeddings.load_embedding(stack.pipe, embeddings.write_a1111_embedding(
        tmp_path / "BadDream.pt", vectors(2, seed=4)))
    tok = stack.pipe.tokenizer
    first = tok.convert_tokens_to_ids("BadDream")
    assert embedding_spans(tok)[first] == 2
    for text, triggered in (("BadDream, a red house", True), ("(baddream:1.2)", True),
                            ("baddreams, a red house", False), ("a xbaddream", False)):
        ids = tokenize_prompt(tok, embeddings.expand_triggers(tok, text))[0].tokens
        assert (first in ids) == triggered, text
    assert embeddings.expand_triggers(tok, "baddreams") == "baddreams"


def test_a_slow_tokenizers_embedding_tokens_are_left_as_added():
    """transformers 4's slow CLIPTokenizer glues a single_word token to a comma after it
    (the embedding would not trigger at all), so only fast tokenizers get whole words."""
    class Slow:
        is_fast = False

        def add_tokens(self, tokens):
            raise AssertionError("a slow tokenizer's added tokens were changed")

    embeddings._whole_words_only(Slow(), "BadDream", 2)


def test_embedding_formats_and_explicit_token(stack, tmp_path):
    import safetensors.torch

    kohya = embeddings.write_a1111_embedding(tmp_path / "kohya_emb.safetensors", vectors(2, seed=3))
    assert set(safetensors.torch.load_file(str(kohya))) == {"emb_params"}
    single = tmp_path / "learned.safetensors"
    safetensors.torch.save_file({"<cat-toy>": vectors(1, seed=4)[0]}, str(single))
    for path, token, n in ((kohya, None, 2), (single, "CatToy", 1)):
        record = embeddings.load_embedding(stack.pipe, path, token)
        assert (record.token, record.vectors) == (token or path.stem, n)
        assert torch.allclose(stack.pipe.text_encoder.get_input_embeddings().weight[
            stack.pipe.tokenizer.convert_tokens_to_ids(record.token)],
            embeddings.read_embedding(path)["clip_l"][0])
    again = embeddings.write_a1111_embedding(tmp_path / "again" / "kohya_emb.pt", vectors(1))
    with pytest.raises(NetworkError, match=r"again/kohya_emb\.pt: its token 'kohya_emb' is "
                                           r"already taken by .*kohya_emb\.safetensors"):
        embeddings.load_embedding(stack.pipe, again)


def test_embedding_width_mismatch_is_refused(stack, tmp_path):
    wide = embeddings.write_a1111_embedding(tmp_path / "sd15_style.pt", vectors(2, width=768))
    vocab = len(stack.pipe.tokenizer)
    with pytest.raises(NetworkError) as err:
        embeddings.load_embedding(stack.pipe, wide)
    assert "sd15_style.pt" in str(err.value) and "width 768" in str(err.value)
    assert "text encoder's width 64" in str(err.value)
    xl = embeddings.write_a1111_embedding(tmp_path / "xl_emb.safetensors",
                                          {"clip_l": vectors(2), "clip_g": vectors(2, 32)})
    with pytest.raises(NetworkError, match=r"xl_emb\.safetensors: an SDXL embedding"):
        embeddings.load_embedding(stack.pipe, xl)
    assert len(stack.pipe.tokenizer) == vocab  # nothing was added
    with pytest.raises(NetworkError, match="already a word"):  # byte-level vocab has "a"
        embeddings.load_embedding(stack.pipe, embeddings.write_a1111_embedding(
            tmp_path / "a.pt", vectors(1)))


# ---- hypernetworks ---------------------------------------------------------------------------

def test_hypernetwork_multiplier(stack, base, tmp_path, monkeypatch):
    path = hypernetwork.write_a1111_hypernetwork(tmp_path / "hn.pt", 64, [1, 2, 1], seed=1)
    assert hypernetwork.hypernetwork_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[
        :10]
    reads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or original(*a, **k))
    nets = hypernetwork.Hypernetworks(stack.pipe)
    default = {type(p) for p in stack.pipe.unet.attn_processors.values()}
    try:
        nets.apply([(path, 0.0)])
        assert diff(render(stack), base) == 0
        nets.apply([(path, 1.0)])
        one = render(stack)
        assert diff(one, base) > 5
        nets.apply([(path, 0.5)])
        half = render(stack)
        assert diff(half, one) > 0 and diff(half, base) > 0
        nets.apply([(path, 1.0)])
        assert diff(render(stack), one) == 0
    finally:
        nets.apply([])
    assert len(reads) == 1  # multipliers change without reading the file again
    assert {type(p) for p in stack.pipe.unet.attn_processors.values()} == default
    assert diff(render(stack), base) == 0


def test_an_axis_over_many_hypernetworks_keeps_only_a_few_loaded(stack, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(hypernetwork, "KEEP_UNUSED", 1)
    files = [hypernetwork.write_a1111_hypernetwork(tmp_path / f"h{i}.pt", 64, [1, 2, 1],
                                                   seed=i) for i in range(4)]
    nets = hypernetwork.Hypernetworks(stack.pipe)
    try:
        for f in files:
            nets.apply([(f, 1.0)])
            assert len(nets.loaded) <= 2
        nets.apply([(files[2], 1.0), (files[3], 0.5)])
        assert set(nets.loaded) == {files[2].resolve(), files[3].resolve()}
    finally:
        nets.apply([])


def test_hypernetwork_file_format(tmp_path):
    import torch.nn.functional as F

    path = hypernetwork.write_a1111_hypernetwork(
        tmp_path / "ln.pt", [64, 768], [1, 2, 2, 1], seed=3, activation_func="swish",
        is_layer_norm=True, use_dropout=True)
    data = torch.load(path, weights_only=True)
    assert set(k for k in data if isinstance(k, int)) == {64, 768}
    # Linear, act, LayerNorm, Dropout(0.3); Linear, act, LayerNorm; Linear, LayerNorm
    assert sorted(data[64][0]) == sorted(f"linear.{i}.{p}" for i in (0, 2, 4, 6, 7, 8)
                                         for p in ("weight", "bias"))
    net = hypernetwork.Hypernetwork(path)
    x = torch.randn(2, 5, 64)
    k = net.layers[64][0]
    sd = data[64][0]
    h = F.layer_norm(F.hardswish(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"])),
                     (128,), sd["linear.2.weight"], sd["linear.2.bias"])
    h = F.layer_norm(F.hardswish(F.linear(h, sd["linear.4.weight"], sd["linear.4.bias"])),
                     (128,), sd["linear.6.weight"], sd["linear.6.bias"])
    h = F.layer_norm(F.linear(h, sd["linear.7.weight"], sd["linear.7.bias"]), (64,),
                     sd["linear.8.weight"], sd["linear.8.bias"])
    assert torch.allclose(k(x), h, atol=1e-6)  # eval mode: dropout is off
    old = tmp_path / "old.pt"  # the first WebUI format: linear1/linear2, no metadata
    torch.save({64: [{"linear1.weight": torch.ones(128, 64), "linear1.bias": torch.zeros(128),
                      "linear2.weight": torch.ones(64, 128), "linear2.bias": torch.zeros(64)}] * 2,
                "name": "old"}, old)
    assert torch.allclose(hypernetwork.Hypernetwork(old).layers[64][1](torch.ones(1, 64)),
                          torch.full((1, 64), 64.0 * 128))


def test_hypernetwork_for_other_widths_is_refused(stack, tmp_path):
    path = hypernetwork.write_a1111_hypernetwork(tmp_path / "sd15.pt", [320, 640, 768, 1280])
    with pytest.raises(NetworkError, match=r"sd15\.pt: made for context widths \[320, 640, 768, "
                                           r"1280\].*widths \[64, 128\]"):
        hypernetwork.Hypernetworks(stack.pipe).apply([(path, 1.0)])
    pickle = tmp_path / "code.pt"
    torch.save({64: [torch.nn.Linear(2, 2)] * 2}, pickle)
    with pytest.raises(NetworkError, match=r"code\.pt: cannot be read safely"):
        hypernetwork.Hypernetwork(pickle)


def test_lora_and_hypernetwork_together_in_either_order(stack, base, loras, tmp_path):
    hn = hypernetwork.write_a1111_hypernetwork(tmp_path / "hn.pt", 64, seed=5)
    path = lora.write_kohya_lora(tmp_path / "late.safetensors", stack.pipe.unet,
                                 stack.pipe.text_encoder, seed=9)
    nets, s = hypernetwork.Hypernetworks(stack.pipe), lora.LoraSet(stack.pipe)
    try:
        nets.apply([(hn, 1.0)])
        s.apply([(path, 1.0)])  # loaded while the hypernetwork processors are attached
        first = render(stack)
        nets.apply([])
        s.apply([])
        assert diff(render(stack), base) == 0
        s.apply([(path, 1.0)])
        lora_only = render(stack)
        nets.apply([(hn, 1.0)])
        assert diff(render(stack), first) == 0
        assert diff(first, lora_only) > 0
    finally:
        nets.apply([])
        s.apply([])


# ---- SDXL ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    """A tiny SDXL-architecture pipeline (two text encoders, 32 and 64 wide; text_time)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def sdxl_text(pipe, prompt="a red house"):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    return embeds, pooled


def test_sdxl_lora_loads_into_unet_and_both_text_encoders(sdxl_pipe, tmp_path, stack):
    pipe = sdxl_pipe
    path = lora.write_kohya_lora(tmp_path / "xl.safetensors", pipe.unet, pipe.text_encoder,
                                 text_encoder_2=pipe.text_encoder_2, seed=4)
    keys = lora.read_safetensors_header(path)[0]
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL layout
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {
        "lora_te1", "lora_te2"}
    lora.check_lora(path, pipe)
    before = sdxl_text(pipe)
    s = lora.LoraSet(pipe)
    s.apply([(path, 1.0)])
    assert pipe.get_list_adapters() == {"unet": ["xl"], "text_encoder": ["xl"],
                                        "text_encoder_2": ["xl"]}
    expected = sum(1 for k in keys if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
    assert sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.xl")) == expected
    after = sdxl_text(pipe)
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    s.apply([])
    assert all(torch.equal(a, b) for a, b in zip(before, sdxl_text(pipe), strict=True))
    sd1 = lora.write_kohya_lora(tmp_path / "sd1.safetensors", stack.pipe.unet,
                                stack.pipe.text_encoder)
    with pytest.raises(NetworkError, match=r"sd1\.safetensors: .*width 64.*SDXL-like"):
        lora.check_lora(sd1, pipe)


def test_sdxl_text_encoder_weight_moves_both_text_encoders(sdxl_pipe, tmp_path):
    pipe = sdxl_pipe
    path = lora.write_kohya_lora(tmp_path / "xl_split.safetensors", pipe.unet,
                                 pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, seed=6)
    s = lora.LoraSet(pipe)
    s.apply([])
    plain_text, plain_unet = sdxl_text(pipe), unet_out_sdxl(pipe)
    s.apply([(path, (0.0, 1.0))])
    assert all(torch.equal(a, b) for a, b in zip(plain_text, sdxl_text(pipe), strict=True))
    assert not torch.equal(unet_out_sdxl(pipe), plain_unet)
    s.apply([(path, (1.0, 0.0))])
    embeds, pooled = sdxl_text(pipe)
    width = pipe.text_encoder.config.hidden_size  # embeds: encoder 1's, then encoder 2's
    assert not torch.equal(embeds[..., :width], plain_text[0][..., :width])
    assert not torch.equal(embeds[..., width:], plain_text[0][..., width:])
    assert not torch.equal(pooled, plain_text[1])  # encoder 2's alone
    assert torch.equal(unet_out_sdxl(pipe), plain_unet)
    s.apply([])


@torch.no_grad()
def unet_out_sdxl(pipe):
    gen = torch.Generator("cpu").manual_seed(5)
    config = pipe.unet.config
    latent = torch.randn((1, config.in_channels, 8, 8), generator=gen)
    context = torch.randn((1, 77, config.cross_attention_dim), generator=gen)
    pooled = torch.randn((1, pipe.text_encoder_2.config.projection_dim), generator=gen)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    return pipe.unet(latent, 500, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_sdxl_embedding_pairs(sdxl_pipe, tmp_path):
    pipe = sdxl_pipe
    pair = {"clip_l": vectors(2, 32, seed=6), "clip_g": vectors(2, 64, seed=7)}
    path = embeddings.write_a1111_embedding(tmp_path / "XlStyle.safetensors", pair)
    plain = sdxl_text(pipe, "XlStyle house")
    embeddings.load_embedding(pipe, path)
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("XlStyle", "XlStyle_1")]
        assert torch.allclose(encoder.get_input_embeddings().weight[ids], pair[key])
    text = embeddings.expand_triggers(pipe.tokenizer, "XlStyle house")
    triggered = sdxl_text(pipe, text)
    assert not torch.equal(plain[0], triggered[0]) and not torch.equal(plain[1], triggered[1])
    sd1 = embeddings.write_a1111_embedding(tmp_path / "one.pt", vectors(1))
    with pytest.raises(NetworkError, match=r"one\.pt: a single-encoder embedding.*clip_l \+ "
                                           "clip_g"):
        embeddings.load_embedding(pipe, sd1)


def test_sdxl_hypernetwork(sdxl_pipe, tmp_path):
    pipe = sdxl_pipe
    path = hypernetwork.write_a1111_hypernetwork(tmp_path / "xl_hn.pt", [64, 96], seed=8)
    embeds, pooled = sdxl_text(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]]).float()}

    def unet():
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=embeds,
                             added_cond_kwargs=cond).sample

    plain = unet()
    nets = hypernetwork.Hypernetworks(pipe)
    nets.apply([(path, 1.0)])
    changed = unet()
    nets.apply([])
    assert not torch.equal(plain, changed)
    assert torch.equal(plain, unet())


def test_a_lora_cut_short_is_refused_up_front_naming_the_file(tmp_path):
    """A half-downloaded LoRA has a whole header (and maybe its sshs_model_hash): its
    tensors' end past the file's end gives it away before any work."""
    import safetensors.torch

    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64)},
                                str(path), metadata={"sshs_model_hash": "0" * 64})
    assert lora.read_safetensors_header(path)[0] == {"lora_unet_x.lora_down.weight": (4, 64)}
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(NetworkError, match=r"half\.safetensors: not a readable .*cut short.*"
                                           r"download it again"):
        lora.read_safetensors_header(path)


def test_a_pipeline_that_keeps_loras_loaded_exports_its_own_weights(tiny_spec):
    """A stack keeps LoRAs as peft adapters between batches; a single file written from it
    has the model's own keys and weights, not base_layer / lora_A ones."""
    from sdbatch.models import ldm_export, tiny
    from sdbatch.models.stack import load

    s = load(tiny_spec, torch.device("cpu"))
    plain = ldm_export.pipeline_to_ldm(s.pipe)
    s.use_networks([(tiny.family_models() / "Lora" / "LegoAlrev.safetensors", 1.0)], [])
    s.use_networks([], [])
    after = ldm_export.pipeline_to_ldm(s.pipe)
    assert after.keys() == plain.keys()
    assert all(torch.equal(after[k], plain[k]) for k in plain)
