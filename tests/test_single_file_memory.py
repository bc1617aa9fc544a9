"""Loading a single file costs the weights, not the weights plus the file: each model is built
from its own tensors, read (and cast) just before it is built and never held beside the rest
of the file. benchmarks/single_file_peak.py measures the resulting peak on real shapes."""

from __future__ import annotations

import pytest
import torch

from sdbatch.models import ldm_export, single_file
from sdbatch.models.single_file import Checkpoint

from .test_single_file import config_only, same_weights

OWN = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
       "text_encoder": "cond_stage_model."}


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory, tiny_stack, tiny_spec):
    folder = tmp_path_factory.mktemp("tiny-fp16")
    files = {suffix: ldm_export.save_single_file(tiny_stack.pipe, folder / f"tiny{suffix}",
                                                 dtype=torch.float16)
             for suffix in (".safetensors", ".ckpt")}
    return files, config_only(tiny_spec.path, folder / "config")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_each_model_gets_only_its_own_tensors_cast_as_read(tiny_fp16, tiny_stack, monkeypatch,
                                                           suffix):
    files, config = tiny_fp16
    all_keys = set(single_file.read_shapes(files[suffix]))
    taken, left, checkpoints = {}, {}, []
    real_take = Checkpoint.take

    def take(self, name):
        checkpoints.append(self)
        tensors = real_take(self, name)
        taken[name] = tensors.keys()
        left[name] = set(self.shapes) | set(self._tensors or {})
        assert {t.dtype for t in tensors.values()} == {torch.float32}, name  # no fp16 copies
        return tensors

    monkeypatch.setattr(Checkpoint, "take", take)
    pipe = single_file.load_single_file(files[suffix], dtype=torch.float32, config=config)
    assert set(taken) == set(OWN)
    for name, prefix in OWN.items():
        assert taken[name] and all(k.startswith(prefix) for k in taken[name]), name
        assert not left[name] & set(taken[name]), f"{name}'s tensors stayed in the checkpoint"
    assert set().union(*taken.values()) == all_keys
    assert not checkpoints[-1].shapes and not checkpoints[-1]._tensors
    for name in OWN:  # the shipped fp16 weights, upcast: the fp16 file lost nothing
        assert same_weights(getattr(pipe, name), getattr(tiny_stack.pipe, name)) == [], name


def test_a_short_tensor_read_is_reported_as_a_truncated_file(tiny_fp16, tmp_path, monkeypatch):
    files, _ = tiny_fp16
    checkpoint = Checkpoint(files[".safetensors"], torch.float32)
    path = tmp_path / "cut.safetensors"
    data = files[".safetensors"].read_bytes()
    path.write_bytes(data[:len(data) // 2])
    checkpoint.path = path  # the file shrank after its header was read
    with pytest.raises(single_file.ModelFileError, match="corrupt or truncated"):
        for name in OWN:
            checkpoint.take(name)
