"""Names resolve as in the WebUI; hashes are computed once; stacks are cached LRU."""

from pathlib import Path

import pytest
import torch

from sdbatch.model_specs import resolve
from sdbatch.models import hashing, names
from sdbatch.models.stack import StackCache, StackSpec
from sdbatch.schema import validate


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "sd-models"
    for rel in ("Stable-diffusion/dreamshaper_8.safetensors",
                "Stable-diffusion/sdxl/juggernaut.ckpt",
                "VAE/vae-ft-mse-840000-ema-pruned.safetensors", "Lora/LegoAlrev.safetensors",
                "Lora/styles/pixel-art.safetensors", "embeddings/easynegative.pt",
                "hypernetworks/anime.pt", "Stable-diffusion/readme.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    diffusers_folder = root / "Stable-diffusion" / "my-diffusers"
    (diffusers_folder / "unet").mkdir(parents=True)
    (diffusers_folder / "model_index.json").write_text("{}")
    (diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    return root


@pytest.mark.parametrize("kind,name,expected", [
    ("checkpoint", "dreamshaper_8", "Stable-diffusion/dreamshaper_8.safetensors"),
    ("checkpoint", "dreamshaper_8.safetensors", "Stable-diffusion/dreamshaper_8.safetensors"),
    ("checkpoint", "juggernaut", "Stable-diffusion/sdxl/juggernaut.ckpt"),
    ("checkpoint", "sdxl/juggernaut", "Stable-diffusion/sdxl/juggernaut.ckpt"),
    ("checkpoint", "my-diffusers", "Stable-diffusion/my-diffusers"),
    ("vae", "vae-ft-mse-840000-ema-pruned", "VAE/vae-ft-mse-840000-ema-pruned.safetensors"),
    ("lora", "pixel-art", "Lora/styles/pixel-art.safetensors"),
    ("embedding", "easynegative", "embeddings/easynegative.pt"),
    ("hypernetwork", "anime", "hypernetworks/anime.pt"),
])
def test_bare_names_resolve_in_the_kinds_folder(models, kind, name, expected):
    assert names.resolve(kind, name, models) == models / expected


def test_parts_of_a_diffusers_folder_are_not_checkpoints(models):
    found = names.candidates("checkpoint", models)
    assert models / "Stable-diffusion/my-diffusers" in found
    assert not any("unet" in str(p) for p in found)
    assert not any(p.suffix == ".txt" for p in found)


def test_unknown_name_lists_the_nearest(models):
    with pytest.raises(names.NameNotFound, match="nearest: dreamshaper_8"):
        names.resolve("checkpoint", "dreamshaper8", models)
    with pytest.raises(names.NameNotFound, match="paths.models is not set"):
        names.resolve("lora", "LegoAlrev", None)


def test_a_path_is_taken_as_is(models):
    path = models / "Lora" / "LegoAlrev.safetensors"
    assert names.resolve("lora", str(path), None) == path


def test_resolve_reports_every_missing_file_with_its_key(models):
    job = validate({"paths": {"models": str(models)},
                    "model": {"checkpoint": "nope", "vae": "vea", "embeddings": ["easyneg"]}})
    spec, problems = resolve(job.model, job.paths, "nope", lambda key: "jobs/x.yaml")
    assert spec is None
    assert [p.key for p in problems] == ["model.checkpoint", "model.vae", "model.embeddings"]
    assert "easynegative" in str(problems[2])


def test_missing_models_folder_is_named(tmp_path):
    job = validate({"paths": {"models": str(tmp_path / "nowhere")}})
    _, problems = resolve(job.model, job.paths, "tiny")
    assert problems[0].key == "paths.models" and "no such folder" in problems[0].message


def test_hub_id_offline_and_uncached_fails_up_front(monkeypatch):
    job = validate({"model": {"checkpoint": "someone/not-cached-model"}})
    _, problems = resolve(job.model, job.paths, "someone/not-cached-model")
    assert problems and "HF_HUB_OFFLINE" in problems[0].message


def test_the_webuis_folders_links_and_extension_choice(models, tmp_path):
    """A stock WebUI keeps embeddings beside models/, links subfolders in, and of x.ckpt and
    x.safetensors loads the .safetensors."""
    beside = models.parent / "embeddings" / "neg" / "badhands.safetensors"
    beside.parent.mkdir(parents=True)
    beside.write_bytes(b"x")
    assert names.resolve("embedding", "badhands", models) == beside
    assert names.embeddings_in([models])["badhands"] == beside
    elsewhere = tmp_path / "shared-loras"
    elsewhere.mkdir()
    (elsewhere / "detail.safetensors").write_bytes(b"x")
    (elsewhere / "loop").symlink_to(elsewhere)  # a link back up is walked once
    (models / "Lora" / "shared").symlink_to(elsewhere)
    assert names.resolve("lora", "detail", models) == models / "Lora/shared/detail.safetensors"
    assert names.resolve("lora", "shared/detail", models).name == "detail.safetensors"
    (models / "Stable-diffusion/dreamshaper_8.ckpt").write_bytes(b"x")  # sorts first
    assert names.resolve("checkpoint", "dreamshaper_8", models).suffix == ".safetensors"
    assert names.resolve("checkpoint", "dreamshaper_8.ckpt", models).suffix == ".ckpt"


def test_a_mistyped_local_name_that_looks_like_a_hub_id_says_what_is_there(models):
    job = validate({"model": {"checkpoint": "SDXL/juggernaut"}, "paths": {"models": str(models)}})
    _, problems = resolve(job.model, job.paths, "SDXL/juggernaut")
    assert "HF_HUB_OFFLINE" in problems[0].message
    assert "nearest: sdxl/juggernaut" in problems[0].message
    import shutil

    from sdbatch.models import tiny

    shutil.copytree(tiny.family_models() / "tiny", models / "Stable-diffusion/sub/tiny-copy")
    job = validate({"model": {"checkpoint": "sub/tiny-copy"}, "paths": {"models": str(models)}})
    spec, problems = resolve(job.model, job.paths, "sub/tiny-copy")
    assert problems == [] and spec.name == "tiny-copy"  # the WebUI's Model: the file's name


def test_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    calls = []
    real = hashing.hashlib.sha256
    monkeypatch.setattr(hashing.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = hashing.sha256(f)
    assert hashing.sha256(f) == first and len(calls) == 1
    f.write_bytes(b"other" * 1000)
    assert hashing.sha256(f) != first and len(calls) == 2
    assert hashing.model_hash(f) == real(b"other" * 1000).hexdigest()[:10]


def test_stack_cache_loads_once_and_evicts_least_recently_used():
    loaded = []

    class Fake:
        def __init__(self, spec):
            self.spec = spec

        def nbytes(self):
            return 2**30

    cache = StackCache(torch.device("cpu"), budget_gb=1,
                       loader=lambda spec, device: loaded.append(spec.name) or Fake(spec))
    specs = {n: StackSpec(n, Path(n)) for n in "abc"}
    for n in "aab":
        cache.get(specs[n])
    assert loaded == ["a", "b"]
    cache.get(specs["a"])  # a is now the most recent
    cache.get(specs["c"])  # over budget: b goes
    assert list(cache.stacks) == [specs["a"].identity, specs["c"].identity]
    cache.get(specs["b"])
    assert loaded == ["a", "b", "c", "b"]


@pytest.fixture(autouse=True)
def _identity_without_files(monkeypatch):
    monkeypatch.setattr(StackSpec, "identity", property(lambda self: self.name), raising=False)


def test_a_lora_is_found_by_the_name_it_was_trained_as(models):
    """The WebUI inserts a LoRA's alias (ss_output_name) into prompts by default; copied,
    such a tag must find the file."""
    import safetensors.torch

    path = models / "Lora" / "more_details.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path),
                                metadata={"ss_output_name": "add_detail"})
    assert names.resolve("lora", "add_detail", models) == path
    assert names.resolve("lora", "more_details", models) == path
    with pytest.raises(names.NameNotFound):
        names.resolve("lora", "add_details", models)


def test_the_webuis_automatic_vae_is_the_one_named_like_the_checkpoint(models):
    """sd_vae's "Automatic": the first VAE file, in the WebUI's listing order (the *.vae.*
    files among the checkpoints, .ckpt/.pt/.safetensors; then VAE/, the same), whose file
    name starts with the checkpoint's."""
    for rel in ("VAE/dreamshaper_8.vae.pt", "VAE/dreamshaper_8-v10.vae.pt",
                "VAE/dreamshaper_8-v2.vae.pt", "VAE/dreamshaper_8.vae.ckpt",
                "Stable-diffusion/sdxl/juggernaut.vae.safetensors", "VAE/juggernaut.pt"):
        (models / rel).write_bytes(b"vae")
    checkpoint = models / "Stable-diffusion" / "dreamshaper_8.safetensors"
    assert names.vae_near_checkpoint(checkpoint, models) == models / "VAE/dreamshaper_8.vae.ckpt"
    (models / "VAE/dreamshaper_8.vae.ckpt").unlink()  # then the .pt files, in natural order
    assert names.vae_near_checkpoint(checkpoint, models) == models / "VAE/dreamshaper_8-v2.vae.pt"
    juggernaut = models / "Stable-diffusion" / "sdxl" / "juggernaut.ckpt"
    assert names.vae_near_checkpoint(juggernaut, models) == \
        models / "Stable-diffusion/sdxl/juggernaut.vae.safetensors"  # before VAE/
    assert names.vae_near_checkpoint(juggernaut, None) == \
        models / "Stable-diffusion/sdxl/juggernaut.vae.safetensors"  # beside it, no models
    assert names.vae_near_checkpoint(models / "Stable-diffusion/other.safetensors",
                                     models) is None
    # glob's `**` lists a folder's own files before its subfolders'
    (models / "Stable-diffusion" / "dreamshaper_8.vae.pt").write_bytes(b"vae")
    (models / "Stable-diffusion" / "a").mkdir()
    (models / "Stable-diffusion" / "a" / "dreamshaper_8-refiner.vae.pt").write_bytes(b"vae")
    assert names.vae_near_checkpoint(checkpoint, models) == \
        models / "Stable-diffusion/dreamshaper_8.vae.pt"


def test_model_vae_null_is_automatic_and_none_is_the_checkpoints_own(models):
    (models / "VAE" / "dreamshaper_8.vae.pt").write_bytes(b"vae")
    for vae, want in ((None, models / "VAE" / "dreamshaper_8.vae.pt"), ("None", None),
                      ("vae-ft-mse-840000-ema-pruned",
                       models / "VAE/vae-ft-mse-840000-ema-pruned.safetensors")):
        job = validate({"paths": {"models": str(models)},
                        "model": {"checkpoint": "dreamshaper_8", "vae": vae,
                                  "family": "sd15"}})
        with pytest.MonkeyPatch.context() as m:
            m.setattr("sdbatch.models.families.detect_family", lambda *a: "sd15")
            spec, problems = resolve(job.model, job.paths, "dreamshaper_8")
        assert problems == [] and spec.vae == want, vae


def test_a_checkpoint_folder_that_is_no_pipeline_is_a_problem_up_front(tmp_path):
    """It failed at load, after the run had started, stopping every other checkpoint."""
    folder = tmp_path / "wrongdir"
    folder.mkdir()
    for index, why in ((None, "no model_index.json"),
                       ("{}", "its model_index.json names no _class_name"),
                       ("[1]", "its model_index.json is not a JSON object")):
        if index is not None:
            (folder / "model_index.json").write_text(index)
        job = validate({"model": {"checkpoint": str(folder)}})
        spec, problems = resolve(job.model, job.paths, str(folder))
        assert spec is None and [p.key for p in problems] == ["model.checkpoint"]
        assert f"{folder} is not a diffusers folder ({why}); give a .safetensors" in \
            problems[0].message


def test_a_name_of_two_files_is_refused_naming_both(models):
    """The WebUI takes whichever it listed last; sdbatch asks which (x.ckpt and
    x.safetensors are one model in two formats, not two)."""
    for rel in ("Lora/a/dup.safetensors", "Lora/b/dup.safetensors", "LyCORIS/solo.safetensors"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"x")
    with pytest.raises(names.NameNotFound, match=r"'dup' names 2 lora files: "
                       r"Lora/a/dup.safetensors, Lora/b/dup.safetensors; give one by its "
                       r"subfolder \(sub/name\) or its path"):
        names.resolve("lora", "dup", models)
    assert names.resolve("lora", "a/dup", models) == models / "Lora/a/dup.safetensors"
    assert names.resolve("lora", "solo", models) == models / "LyCORIS/solo.safetensors"


def test_a_mistyped_embedded_model_is_pointed_to_it():
    job = validate({"model": {"checkpoint": "tinyy"}})
    _, [problem] = resolve(job.model, job.paths, "tinyy")
    assert problem.message.endswith("or did you mean 'tiny', the embedded model?")


def test_a_name_of_two_files_is_not_looked_for_in_the_tiny_family_instead(models):
    from sdbatch.model_specs import _find_in
    from sdbatch.models import tiny

    for rel in ("Lora/a/LegoAlrev.safetensors", "Lora/b/LegoAlrev.safetensors"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_bytes(b"x")
    with pytest.raises(names.AmbiguousName, match="names 3 lora files"):
        _find_in([models, tiny.family_models()], "lora", "LegoAlrev")


def test_an_upscaler_name_of_two_files_is_refused_not_the_tiny_familys(models):
    from sdbatch.model_specs import _first_upscaler
    from sdbatch.models import tiny, upscaler_models

    for sub in ("a", "b"):
        (models / "ESRGAN" / sub).mkdir(parents=True)
        (models / "ESRGAN" / sub / "2x-tiny-Compact.pth").write_bytes(b"x")
    with pytest.raises(names.AmbiguousName, match="names 2 upscaler files"):
        _first_upscaler([models, tiny.family_models()], "2x-tiny-Compact",
                        upscaler_models.resolve)
