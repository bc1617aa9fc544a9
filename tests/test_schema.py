from pathlib import Path

import pytest

from sdbatch import schema
from sdbatch.schema import JobError, validate

from .conftest import sdbatch, write_job


def problems(raw) -> list[str]:
    with pytest.raises(JobError) as e:
        validate(raw, lambda key: "jobs/x.yaml")
    return [str(p) for p in e.value.problems]


def test_defaults_make_a_complete_job():
    job = validate({"prompt": "a house"})
    assert job.params.steps == 20 and job.params.cfg_scale == 7.0
    assert job.params.sampler == "DPM++ 2M" and job.model.checkpoint == "tiny"


def test_lists_become_axes_and_ints_become_floats():
    job = validate({"params": {"cfg_scale": [5, 7.5], "seed": 3}})
    assert job.params.cfg_scale == (5.0, 7.5)
    assert job.params.seed == 3


def test_unknown_key_suggests_the_right_one_and_names_the_file():
    [p] = problems({"params": {"widht": 512}})
    assert "params.widht" in p and "jobs/x.yaml" in p and "did you mean 'width'" in p


def test_every_problem_is_reported_at_once():
    found = problems({
        "params": {"width": 500, "steps": "many", "sampler": "Eulr a"},
        "colour": "red",
    })
    text = "\n".join(found)
    assert len(found) == 4
    assert "multiple of 8" in text and "use 496 or 504" in text
    assert "params.steps" in text and "an integer" in text
    assert "unknown sampler 'Eulr a'" in text and "did you mean 'Euler a'" in text
    assert "DPM++ 2M" in text  # the valid samplers are listed
    assert "colour" in text


def test_unknown_sampler_lists_the_valid_ones():
    [p] = problems({"params": {"sampler": "Foo"}})
    for name in ("Euler a", "DPM++ SDE", "DDIM", "Heun", "LMS", "UniPC"):
        assert name in p


def test_sampler_diffusers_cannot_run_names_the_nearest():
    [p] = problems({"params": {"sampler": "DPM++ 2S a"}})
    assert "nearest" in p and "DPM++ SDE" in p


def test_sampler_and_schedule_type_must_fit():
    [p] = problems({"params": {"sampler": "Euler a", "schedule_type": "Karras"}})
    assert "cannot use schedule type 'Karras'" in p


def test_zip_lists_must_have_equal_lengths():
    [p] = problems({"prompt": ["a", "b"], "params": {"seed": [1, 2, 3]},
                    "zip": [["prompt", "seed"]]})
    assert "zip[0]" in p and "prompt has 2" in p and "params.seed has 3" in p


def test_zip_names_axes_by_short_or_dotted_name():
    job = validate({"prompt": ["a", "b"], "params": {"seed": [1, 2]},
                    "zip": [["prompt", "params.seed"]]})
    assert job.zip == (("prompt", "params.seed"),)
    [p] = problems({"prompt": ["a", "b"], "zip": [["prompt", "sed"]]})
    assert "did you mean 'seed'" in p


def test_zip_needs_lists():
    [p] = problems({"prompt": ["a", "b"], "params": {"seed": 1}, "zip": [["prompt", "seed"]]})
    assert "single value" in p


def test_bad_filename_pattern():
    [p] = problems({"run": {"filename": "[index]-[colour]"}})
    assert "[colour]" in p and "[seed]" in p


def test_to_dict_round_trips():
    job = validate({"prompt": ["a", "b"], "params": {"cfg_scale": [5, 7]}})
    assert validate(schema.to_dict(job)) == job


def test_cli_reports_all_problems_with_their_files_and_makes_no_run_folder(tmp_path: Path):
    write_job(tmp_path, "bad", "# @package _global_\nprompt: hi\nparams:\n  widht: 512\n"
              "  sampler: Nope\n")
    proc = sdbatch(tmp_path, "+job=bad", "params.height=100", check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "params.widht (jobs/bad.yaml)" in err
    assert "params.sampler (jobs/bad.yaml)" in err
    assert "params.height (command line 'params.height=100')" in err
    assert not (tmp_path / "outputs").exists()


def test_cli_refuses_a_matrix_over_the_cap(tmp_path: Path):
    write_job(tmp_path, "big", "# @package _global_\nprompt: hi\nparams:\n"
              "  seed: [1, 2, 3]\n  cfg_scale: [4, 5]\nrun:\n  max_images: 5\n")
    proc = sdbatch(tmp_path, "+job=big", check=False)
    assert proc.returncode == 2
    assert "makes 6 images" in proc.stderr and "run.max_images" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_job_folders_from_sdbatch_jobs(tmp_path: Path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "far.yaml").write_text("# @package _global_\nprompt: hi\nparams:\n  width: 7\n")
    monkeypatch.setenv("SDBATCH_JOBS", str(other))
    proc = sdbatch(tmp_path, "+job=far", check=False)
    assert proc.returncode == 2 and "far.yaml" in proc.stderr and "params.width" in proc.stderr


@pytest.mark.parametrize("name", ["../../escape", "a/b", "a\\b", "..", ".", "", " ", "x.",
                                  " x", ".hidden", "CON", "nul.txt", "Com1", "a:b", "x" * 101])
def test_a_job_name_is_one_plain_folder_name(name):
    [p] = problems({"job": {"name": name}})
    assert p.startswith("job.name (jobs/x.yaml): ")


@pytest.mark.parametrize("name", ["lego_building", "v1.5 test-2", "Ünïcode ok", "CONFIG"])
def test_plain_job_names_pass(name):
    assert validate({"job": {"name": name}}).job.name == name


def test_cli_refuses_a_job_name_that_leaves_outputs(tmp_path: Path):
    inner = tmp_path / "a" / "b"
    write_job(inner, "esc", "# @package _global_\nprompt: hi\njob:\n  name: ../../escape\n")
    proc = sdbatch(inner, "+job=esc", check=False)
    assert proc.returncode == 2 and "job.name (jobs/esc.yaml)" in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "esc.yaml", "jobs"]


def test_eta_as_a_list_still_applies_to_ddim_only():
    assert validate({"params": {"sampler": "DDIM", "eta": [0, 1]}}).params.eta == (0.0, 1.0)
    [p] = problems({"params": {"sampler": ["DDIM", "Euler"], "eta": [0, 0.5]}})
    assert "params.eta" in p and "DDIM only" in p and "Euler" in p
    [p] = problems({"params": {"sampler": "DDIM", "eta": [0.5, 2]}})
    assert "params.eta" in p and "at most 1" in p


def test_an_executor_key_of_another_executor_is_refused_with_the_group_to_choose():
    [p] = problems({"executor": {"name": "multi", "partition": "gpu"}})
    assert "executor.partition" in p and "executor=slurm" in p and "jobs/x.yaml" in p
    [p] = problems({"executor": {"name": "multi", "device": "cuda:1"}})
    assert "executor.devices=[cuda:1]" in p
    job = validate({"executor": {"name": "slurm", "partition": "gpu", "shards": 4}})
    assert job.executor.shards == 4
    assert validate({"executor": {"name": "multi", "devices": ["cpu", "cpu"]}}
                    ).executor.devices == ("cpu", "cpu")


def test_every_executor_group_sets_its_name_and_only_keys_the_schema_knows():
    from omegaconf import OmegaConf

    folder = Path(schema.__file__).parents[1] / "conf" / "executor"
    for name in schema.EXECUTORS:
        raw = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"))
        assert validate({"executor": raw}).executor.name == name


def test_lora_split_weights_default_to_weight():
    job = validate({"model": {"loras": [{"name": "a", "weight": 0.8},
                                        {"name": "b", "weight": 0.8, "te_weight": 0.2},
                                        {"name": "c", "unet_weight": 0, "te_weight": 0.5}]}})
    assert [n.parts() for n in job.model.loras] == [(0.8, 0.8), (0.2, 0.8), (0.5, 0.0)]


def test_lora_split_weights_are_checked_and_only_for_loras():
    found = problems({"model": {"loras": [{"name": "a", "te_weight": "half",
                                           "unet_weight": 12}],
                                "hypernetworks": [{"name": "h", "te_weight": 0.5}]}})
    assert any("model.loras[0].te_weight" in p and "must be a number" in p for p in found)
    assert any("model.loras[0].unet_weight" in p and "at most 10" in p for p in found)
    assert any("model.hypernetworks[0].te_weight" in p and "unknown key" in p
               and "valid keys here: name, weight" in p for p in found)
    assert all("jobs/x.yaml" in p for p in found)


@pytest.mark.parametrize("raw,expected", [
    ({"model": {"loras": [{"name": ["LegoAlrev", "x"]}]}},
     "model.loras[0].name (the job): must be a string, got ['LegoAlrev', 'x']; a stack's LoRA "
     "is not an axis"),
    ({"model": {"hypernetworks": [{"name": ["a", "b"]}]}},
     "model.hypernetworks[0].name (the job): must be a string"),
    ({"model": {"loras": [{"name": "LegoAlrev", "weight": [0.5, 1]}]}},
     "must be a number, got [0.5, 1]; a stack's LoRA weight is not an axis: sweep a prompt "
     "axis of tags instead"),
])
def test_a_list_where_a_stack_network_takes_one_value_is_a_problem_with_the_way_to_sweep(
        raw, expected):
    """A refused required key (a LoRA's name given as a list) was a TypeError traceback."""
    with pytest.raises(JobError) as e:
        validate(raw)
    assert expected in str(e.value)


@pytest.mark.parametrize("raw,expected", [
    ({"steps": 3}, "steps (the job): unknown key; did you mean 'params.steps'?"),
    ({"params": {"n_iter": 2}}, "did you mean 'batch_count'? (n_iter is called batch_count"),
    ({"params": {"cfg": 7}}, "did you mean 'cfg_scale'?"),
    ({"params": {"denoising_strength": 0.5}}, "denoise belongs to a post-step that samples "
                                              "again: post: [{img2img: {denoise: 0.5}}]"),
    ({"post": [{"hires_fix": {"denoising_strength": 0.5}}]},
     "post[0].hires_fix.denoising_strength (the job): unknown key; did you mean 'denoise'?"),
])
def test_webui_and_diffusers_key_names_point_to_sdbatchs(raw, expected):
    with pytest.raises(JobError) as e:
        validate(raw)
    assert expected in str(e.value)
