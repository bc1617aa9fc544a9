"""The real CLIP tokenizer, rebuilt offline from the vocabulary shipped in the package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import CLIPTokenizer  # noqa: E402

from sdbatch.models.clip_vocab import (  # noqa: E402
    PAD_OPENCLIP,
    clip_vocab,
    ensure_clip_tokenizer,
    write_clip_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab():
    return clip_vocab()


def test_vocab_is_clips_49408_entries_in_clips_order(vocab):
    assert len(vocab) == 49408
    assert vocab["!"] == 0  # OpenCLIP's pad token
    assert vocab["a</w>"] == 320
    assert vocab[",</w>"] == 267
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(49408))


def test_cached_tokenizer_gives_the_clip_test_vector(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path))
    folder = ensure_clip_tokenizer()
    assert folder.parent == tmp_path / "tokenizers"
    assert ensure_clip_tokenizer() == folder  # built once
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dirs left
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token_id == 49407
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == clip_vocab()
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_openclip_tokenizer_pads_with_bang(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path))
    folder = ensure_clip_tokenizer(PAD_OPENCLIP)
    assert folder != ensure_clip_tokenizer()  # each pad token has its own folder
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70


def test_unknown_pad_token_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pad token"):
        write_clip_tokenizer(tmp_path, "<pad>")


def test_vocabulary_file_is_declared_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["sdbatch.models"]
    shipped = {p.name for p in (REPO / "sdbatch" / "models").iterdir()}
    assert "bpe_simple_vocab_16e6.txt.gz" in shipped
    assert any(Path("bpe_simple_vocab_16e6.txt.gz").match(p) for p in patterns)
    assert any(Path("LICENSE-bpe_simple_vocab_16e6.txt").match(p) for p in patterns)
