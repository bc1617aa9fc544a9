from pathlib import Path

import pytest

from sdbatch import matrix
from sdbatch.prompts import prompt_file
from sdbatch.prompts.sources import normalize
from sdbatch.prompts.styles import apply_style
from sdbatch.schema import JobError, validate


def norm(raw, tmp_path: Path):
    raw.setdefault("paths", {}).setdefault("wildcards", str(tmp_path / "wildcards"))
    raw["paths"].setdefault("styles", str(tmp_path / "styles.csv"))
    return normalize(validate(raw), lambda key: "jobs/x.yaml")


def renders(job, nonce=0):
    return matrix.expand(matrix.resolve_seeds(job, nonce))


@pytest.fixture
def wildcards(tmp_path: Path) -> Path:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards/colour.txt").write_text("red\nblue\n")
    (tmp_path / "wildcards/shade.txt").write_text("dark __colour__\n")
    return tmp_path / "wildcards"


def test_combinatorial_variants_become_axis_values(tmp_path, wildcards):
    job = norm({"prompt": "a {big|small} __colour__ house", "params": {"seed": 1}}, tmp_path)
    assert sorted(job.prompt) == ["a big blue house", "a big red house", "a small blue house",
                                  "a small red house"]
    assert job.dynamic_prompts.mode == "off"  # the job is self-contained now
    assert len(renders(job)) == 4


def test_combinatorial_keeps_zip_partners(tmp_path, wildcards):
    job = norm({"prompt": ["a {red|blue} house", "a tower"], "params": {"seed": [1, 2]},
                "zip": [["prompt", "seed"]]}, tmp_path)
    pairs = sorted((r.prompt, r.seed) for r in renders(job))
    assert pairs == [("a blue house", 1), ("a red house", 1), ("a tower", 2)]


def test_random_mode_picks_by_image_seed(tmp_path, wildcards):
    raw = {"prompt": "a __colour__ {house|tower|castle|hut}",
           "dynamic_prompts": {"mode": "random"},
           "params": {"seed": 100, "batch_count": 8}}
    job = norm(raw, tmp_path)
    first = [r.prompt for r in renders(job)]
    assert first == [r.prompt for r in renders(job)]
    assert len(set(first)) > 1 and all("__" not in p and "{" not in p for p in first)


def test_unknown_wildcard_fails_up_front(tmp_path, wildcards):
    with pytest.raises(JobError, match=r"unknown wildcard\(s\) __nope__.*colour"):
        norm({"prompt": "a __nope__ house"}, tmp_path)


def test_nested_wildcards_are_checked_and_expanded(tmp_path, wildcards):
    job = norm({"prompt": "__shade__ sky"}, tmp_path)
    assert sorted(job.prompt) == ["dark blue sky", "dark red sky"]
    (wildcards / "shade.txt").write_text("dark __missing__\n")
    with pytest.raises(JobError, match="__missing__"):
        norm({"prompt": "__shade__ sky"}, tmp_path)


def test_off_mode_keeps_braces(tmp_path):
    job = norm({"prompt": "a {red|blue} house", "dynamic_prompts": {"mode": "off"}}, tmp_path)
    assert job.prompt == "a {red|blue} house"


def test_styles_from_a_webui_styles_csv(tmp_path):
    (tmp_path / "styles.csv").write_text(
        'name,prompt,negative_prompt\n'
        'cinematic,"cinematic still of {prompt}, film grain","cartoon"\n'
        'sharp,"sharp focus",""\n')
    job = norm({"prompt": ["a house", "a tower"], "negative_prompt": "blurry",
                "styles": ["cinematic", "sharp"]}, tmp_path)
    assert job.prompt == ("cinematic still of a house, film grain, sharp focus",
                          "cinematic still of a tower, film grain, sharp focus")
    assert job.negative_prompt == "blurry, cartoon"
    with pytest.raises(JobError, match="no style named nope.*cinematic, sharp"):
        norm({"prompt": "x", "styles": ["nope"]}, tmp_path)


def test_apply_style():
    assert apply_style("a", "b") == "a, b"
    assert apply_style("", "b") == "b"
    assert apply_style("a", "x {prompt} y") == "x a y"
    assert apply_style("a cat ", "masterpiece") == "a cat, masterpiece"  # merge_prompts strips
    assert apply_style("   ", "masterpiece") == "masterpiece"
    assert apply_style("a cat\n", "masterpiece\n") == "a cat, masterpiece"
    assert apply_style(" a cat ", "") == "a cat"


def test_prompt_file_lines_are_zipped_recipes(tmp_path):
    (tmp_path / "prompts.txt").write_text(
        'a red house\n\n'
        '--prompt "a blue tower" --negative_prompt "fog" --steps 7 --seed 42\n'
        '--prompt "a hut, at night" --sampler_name "Euler a" --clip_skip 2\n')
    job = norm({"prompt_file": str(tmp_path / "prompts.txt"), "negative_prompt": "blurry",
                "params": {"steps": 5, "seed": 1, "cfg_scale": [6, 8]}}, tmp_path)
    rs = renders(job)
    assert len(rs) == 6  # 3 lines x 2 cfg
    by_prompt = {r.prompt: r for r in rs if r.cfg_scale == 6}
    assert by_prompt["a red house"].steps == 5 and by_prompt["a red house"].seed == 1
    tower = by_prompt["a blue tower"]
    assert (tower.steps, tower.seed, tower.negative_prompt) == (7, 42, "fog")
    hut = [r for r in rs if r.prompt == "a hut, at night"]
    assert {(r.sampler, r.clip_skip) for r in hut} == {("Euler a", 2)}
    assert {r.sampler for r in rs if r.prompt != "a hut, at night"} == {"DPM++ 2M"}


def test_prompt_file_errors_name_the_line(tmp_path):
    (tmp_path / "p.txt").write_text('ok\n--steps many\n--colour red\n--prompt "x" --width 500\n')
    with pytest.raises(JobError) as e:
        norm({"prompt_file": str(tmp_path / "p.txt")}, tmp_path)
    text = str(e.value)
    assert "line 2: --steps needs int" in text and "line 3: unknown option --colour" in text
    (tmp_path / "p.txt").write_text('x\n--prompt "x" --width 500\n')
    with pytest.raises(JobError, match=r"line 2: params.width: must be a multiple"):
        norm({"prompt_file": str(tmp_path / "p.txt")}, tmp_path)


def test_prompt_file_joins_unquoted_prompt_words_as_the_webuis_script():
    assert prompt_file.parse_line("--prompt a red house --steps 5 --negative_prompt blurry, dark"
                                  ) == {"prompt": "a red house", "params.steps": 5,
                                        "negative_prompt": "blurry, dark"}


def test_prompt_file_and_a_list_axis_of_the_same_key_conflict(tmp_path):
    (tmp_path / "p.txt").write_text('--prompt "x" --steps 3\n')
    with pytest.raises(JobError, match="sets params.steps"):
        norm({"prompt_file": str(tmp_path / "p.txt"), "params": {"steps": [1, 2]}}, tmp_path)


def test_parse_line_plain_and_options():
    assert prompt_file.parse_line("a house") == {"prompt": "a house"}
    assert prompt_file.parse_line('--prompt "a" --cfg_scale 7') == {"prompt": "a",
                                                                    "params.cfg_scale": 7.0}


def test_more_combinatorial_variants_than_max_variants_is_refused(tmp_path, wildcards):
    raw = {"prompt": ["a tower", "a {big|small} __colour__ {house|hut}"],
           "dynamic_prompts": {"max_variants": 7}}
    with pytest.raises(JobError) as e:
        norm(raw, tmp_path)
    [p] = [str(p) for p in e.value.problems]
    assert p.startswith("prompt (jobs/x.yaml): 'a {big|small} __colour__ {house|hut}' has more "
                        "than 7 combinatorial variants")
    assert "dynamic_prompts.max_variants = 7" in p
    raw["dynamic_prompts"]["max_variants"] = 8
    assert len(norm(raw, tmp_path).prompt) == 9


# --- files as Windows tools save them ---------------------------------------------------------

LINES = '--prompt "a red house" --steps 3\r\n--prompt "une tour bleue, café" --steps 4\r\n'


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])  # Notepad's BOM, PowerShell 5
def test_a_prompt_file_with_a_byte_order_mark_reads_its_first_line(tmp_path, encoding):
    (tmp_path / "p.txt").write_bytes(LINES.encode(encoding))
    job = norm({"prompt_file": str(tmp_path / "p.txt")}, tmp_path)
    assert {(r.prompt, r.steps) for r in renders(job)} == {("a red house", 3),
                                                          ("une tour bleue, café", 4)}


def test_a_broken_utf16_file_is_refused_naming_it(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfea")  # a byte-order mark, then half a unit
    with pytest.raises(JobError, match=r"p.txt is not UTF-16 as its byte-order mark says"):
        norm({"prompt_file": str(tmp_path / "p.txt")}, tmp_path)


def test_a_file_in_a_windows_code_page_is_refused_naming_it(tmp_path):
    (tmp_path / "p.txt").write_bytes(LINES.encode("cp1252"))
    with pytest.raises(JobError, match=r"p.txt is not UTF-8 \(byte \d+ is 0xe9.*save it as UTF-8"):
        norm({"prompt_file": str(tmp_path / "p.txt")}, tmp_path)
    (tmp_path / "styles.csv").write_bytes("name,prompt\nwarm,café light\n".encode("cp1252"))
    with pytest.raises(JobError, match=r"paths.styles.*styles.csv is not UTF-8"):
        norm({"prompt": "x", "styles": ["warm"]}, tmp_path)


def test_styles_csv_of_older_webuis_and_spaced_headers(tmp_path):
    """The WebUI reads a 'text' column where 'prompt' is missing, and skips spaces after
    commas: both gave an empty style before, silently."""
    (tmp_path / "styles.csv").write_text('name,text\nold,"film grain"\n')
    assert norm({"prompt": "a", "styles": ["old"]}, tmp_path).prompt == "a, film grain"
    (tmp_path / "styles.csv").write_text('name, prompt, negative_prompt\nsp, "sharp", "fog"\n')
    job = norm({"prompt": "a", "styles": ["sp"]}, tmp_path)
    assert (job.prompt, job.negative_prompt) == ("a, sharp", "fog")


@pytest.mark.parametrize("data", ["\ufeffred\r\nblue\r\n".encode(), "red\nblue\n".encode("utf-16"),
                                  "café\n".encode("cp1252")])
def test_a_wildcard_file_dynamicprompts_would_misread_is_refused(tmp_path, wildcards, data):
    (wildcards / "colour.txt").write_bytes(data)
    with pytest.raises(JobError, match=r"wildcard __colour__: .*colour.txt"):
        norm({"prompt": "a __colour__ house", "dynamic_prompts": {"mode": "combinatorial"}},
             tmp_path)


def test_a_prompt_beside_a_prompt_file_says_how_to_drop_it(tmp_path):
    (tmp_path / "p.txt").write_text("a red house\n")
    with pytest.raises(JobError, match=r"prompt or prompt_file, not both \(on the command "
                                       r"line, '~prompt' drops the job's prompt\)"):
        norm({"prompt": "a house", "prompt_file": str(tmp_path / "p.txt")}, tmp_path)


def test_prompt_file_lines_draw_a_seed_each_from_a_random_job_seed(tmp_path):
    """The script renders each line with seed -1 drawn anew; a line's --seed leaves the
    others alone; a fixed job seed is every line's, as in the WebUI."""
    (tmp_path / "p.txt").write_text("a cat\na dog\na bird\n")
    plain = renders(norm({"prompt_file": str(tmp_path / "p.txt"),
                          "params": {"seed": -1}}, tmp_path))
    assert len({r.seed for r in plain}) == 3
    (tmp_path / "q.txt").write_text("a cat\n--prompt a dog --seed 5\na bird\n")
    one = renders(norm({"prompt_file": str(tmp_path / "q.txt"),
                        "params": {"seed": -1}}, tmp_path))
    assert [r.seed for r in one][1] == 5
    assert [r.seed for r in one][0::2] == [r.seed for r in plain][0::2]
    fixed = renders(norm({"prompt_file": str(tmp_path / "p.txt"), "params": {"seed": 7}},
                         tmp_path))
    assert [r.seed for r in fixed] == [7, 7, 7]


def test_a_wildcard_that_names_itself_is_a_problem_in_combinatorial_mode(tmp_path):
    folder = tmp_path / "wildcards"
    folder.mkdir()
    (folder / "loop.txt").write_text("x\n__loop__ y\n")
    with pytest.raises(JobError, match=r"never ends in combinatorial mode: a wildcard names "
                                       r"itself"):
        norm({"prompt": "a __loop__"}, tmp_path)


def test_a_prompt_file_option_of_the_whole_job_says_where_it_goes():
    with pytest.raises(ValueError, match=r"--n_iter: a line's own image count is not taken; "
                                         r"give params.batch_count"):
        prompt_file.parse_line("--prompt a cat --n_iter 4")
