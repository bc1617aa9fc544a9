"""Mistakes outside the schema (YAML, Hydra overrides, job names) read like the schema's own:
one clear message, exit code 2, no traceback, no run folder, and no torch imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, sdbatch, write_job

OK = "# @package _global_\nprompt: hi\n"


def refused(tmp_path: Path, *args: str) -> str:
    proc = sdbatch(tmp_path, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
    return proc.stderr


def test_unknown_key_on_the_command_line_reads_like_one_in_a_file(tmp_path: Path):
    write_job(tmp_path, "typo", OK + "params:\n  widht: 64\n")
    err = refused(tmp_path, "+job=typo", "params.stepz=5")
    assert "params.stepz (command line 'params.stepz=5'): unknown key; did you mean 'steps'?" \
        in err
    assert "params.widht (jobs/typo.yaml): unknown key; did you mean 'width'?" in err
    assert "not in struct" not in err


def test_an_unknown_top_level_key_on_the_command_line(tmp_path: Path):
    write_job(tmp_path, "ok", OK)
    err = refused(tmp_path, "+job=ok", "parmas.steps=5")
    assert "parmas (command line 'parmas.steps=5'): unknown key; did you mean 'params'?" in err


def test_a_malformed_override_is_one_line(tmp_path: Path):
    write_job(tmp_path, "ok", OK)
    err = refused(tmp_path, "+job=ok", "params.steps=[1,")
    assert err.count("\n") == 1
    assert err.startswith("sdbatch: command line 'params.steps=[1,': not a valid override")


@pytest.mark.parametrize("text,where,expected", [
    ("params:\n  steps: [1,\n  seed: 2\n", ":6:1:", "expected ',' or ']'"),
    ("params:\n  steps: 3\n   seed: 2\n", ":5:8:", "mapping values are not allowed here"),
])
def test_a_yaml_typo_names_file_line_and_column(tmp_path: Path, text, where, expected):
    write_job(tmp_path, "bad", OK + text)
    err = refused(tmp_path, "+job=bad")
    assert err.count("\n") == 1
    assert f"jobs/bad.yaml{where} not valid YAML: {expected}" in err.replace("\\", "/")


def test_a_missing_job_lists_the_jobs_there(tmp_path: Path):
    write_job(tmp_path, "portrait", OK)
    err = refused(tmp_path, "+job=portrat")
    assert "no portrat.yaml" in err and "jobs there: portrait" in err


@pytest.mark.parametrize("override", ["params.stepz=5", "params.sampler=Eulr",
                                      "params.width=100", "job.name=../x"])
def test_checking_a_bad_job_imports_neither_torch_nor_diffusers(tmp_path: Path, override):
    write_job(tmp_path, "ok", OK)
    probe = (f"import sys\nsys.argv = ['sdbatch', '+job=ok', {override!r}]\n"
             "from sdbatch.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr


def test_a_job_saved_by_windows_tools(tmp_path: Path):
    """Notepad's UTF-8 with BOM (Hydra read its package header past the BOM as none, so the
    whole job moved under job.*), a code page (a traceback), and a Windows path in double
    quotes (YAML escapes)."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "bom.yaml").write_bytes((OK + "params:\n  widht: 64\n").encode(
        "utf-8-sig"))
    err = refused(tmp_path, "+job=bom")
    assert "params.widht (jobs/bom.yaml): unknown key" in err.replace("\\", "/")
    assert "job.prompt" not in err
    (tmp_path / "jobs" / "ansi.yaml").write_bytes((OK + "negative_prompt: café\n").encode(
        "cp1252"))
    err = refused(tmp_path, "+job=ansi")
    assert "ansi.yaml is not UTF-8" in err and "save it as UTF-8" in err
    write_job(tmp_path, "path", OK + 'init_image: "C:\\sd\\x.png"\n')
    err = refused(tmp_path, "+job=path")
    assert "unknown escape" in err and "single quotes or with /" in err


def test_a_printed_command_quotes_its_path_as_the_users_shell_reads_it(monkeypatch):
    from sdbatch import inputs

    assert inputs.command_arg(Path("outputs/job/20261126-010044")) == \
        "outputs/job/20261126-010044"
    assert inputs.command_arg(Path("outputs/my job/x")) == "'outputs/my job/x'"
    monkeypatch.setattr(inputs.sys, "platform", "win32")  # cmd and PowerShell: "..."
    assert inputs.command_arg(Path("outputs/my job/x")) == '"outputs/my job/x"'


def test_the_override_hint_quotes_for_cmd_on_windows(monkeypatch, capsys):
    from sdbatch import cli

    monkeypatch.setattr(cli.sys, "platform", "win32")
    with pytest.raises(SystemExit):
        cli.check_command_line(["params.steps=[1,"])
    err = capsys.readouterr().err
    assert "\"params.seed=[1,2]\"" in err and "\"prompt='a cat'\"" in err


@pytest.mark.parametrize("text,expected", [
    ("# my job\n" + OK, "header is on line 2, after other lines; Hydra reads it only at the "
                        "top: move it to the first line"),
    ("prompt: hi\n", "it has no `# @package _global_` header; make that the first line"),
    (OK + "prompt: again\n", ":3:1: not valid YAML: the key 'prompt' is given twice (first on "
                             "line 2); keep one"),
    (OK + "params:\n\tsteps: 2\n", "not valid YAML: found character '\\t' that cannot start "
                                   "any token (indent with spaces: YAML takes no tabs)"),
])
def test_a_job_file_hydra_would_misread_is_refused_saying_how(tmp_path: Path, text, expected):
    write_job(tmp_path, "bad", text)
    err = refused(tmp_path, "+job=bad")
    assert err.count("\n") == 1 and "jobs/bad.yaml" in err.replace("\\", "/")
    assert expected in err


def test_a_job_named_with_its_extension_says_how_to_name_it(tmp_path: Path):
    write_job(tmp_path, "ok", OK)
    assert "a job is named without .yaml: +job=ok" in refused(tmp_path, "+job=ok.yaml")


def test_no_arguments_print_the_usage_instead_of_rendering_the_defaults(tmp_path: Path):
    err = refused(tmp_path)
    assert err.startswith("usage:") and "sdbatch +job=NAME" in err


def test_a_job_files_path_as_an_argument_says_how_to_name_the_job(tmp_path: Path):
    write_job(tmp_path, "t", OK)
    err = refused(tmp_path, "jobs/t.yaml")
    assert "a job is given by its name, +job=t" in err


def test_ctrl_c_before_the_runs_own_handling_is_one_line_not_a_traceback(monkeypatch, capsys):
    from sdbatch import cli
    from sdbatch import run as runner
    from sdbatch.schema import validate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.run_job(validate({"prompt": "hi"}), lambda key: "test", [])
    assert e.value.code == 130
    assert capsys.readouterr().err.startswith("sdbatch: stopped (Ctrl-C); a run folder named")


def test_a_closed_pipe_stops_only_a_command_that_just_prints_quietly(monkeypatch):
    """`sdbatch show IMG | head` exits 0; a resume or a verify into a closed pipe must not
    pass for a finished run or a check that held."""
    from sdbatch import cli

    def broken(args):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "resume", broken)
    monkeypatch.setattr(cli.sys, "argv", ["sdbatch", "resume", "RUN"])
    with pytest.raises(BrokenPipeError):
        cli.main()
