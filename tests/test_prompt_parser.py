"""The WebUI's prompt syntax: expected values are the WebUI's own (v1.10 doctests and runs)."""

from __future__ import annotations

import pytest

from sdbatch.prompts.parser import (
    ExtraNetwork,
    extract_extra_networks,
    is_break,
    lora_weight,
    parse_emphasis,
    prompt_at_step,
    schedules,
)

DOWN = 1 / 1.1

# ------------------------------------------------------------------------------ emphasis


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("[x]", [("x", DOWN)]),
    ("[[x]]", [("x", DOWN * DOWN)]),
    ("((x:1.5))", [("x", 1.5 * 1.1)]),
    ("(x: 1.3 )", [("x", 1.3)]),
    ("(x:-0.5)", [("x", -0.5)]),
    ("[(x:2)]", [("x", 2 * DOWN)]),
    ("", [("", 1.0)]),
])
def test_emphasis_basics(text, expected):
    assert parse_emphasis(text) == expected


def test_emphasis_nesting_matches_webui_floats_exactly():
    # The WebUI's doctest; exact floats matter because equal weights are merged by ==.
    assert parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


@pytest.mark.parametrize("text, expected", [
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"\[x\] \\ y", [("[x] \\ y", 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a backslash before anything else is dropped
    (r"(\(x\))", [("(x)", 1.1)]),
])
def test_emphasis_escapes(text, expected):
    assert parse_emphasis(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("(unbalanced", [("unbalanced", 1.1)]),  # an opener never closed runs to the end
    ("[unbalanced", [("unbalanced", DOWN)]),
    ("a) b] c", [("a) b] c", 1.0)]),  # closers with no opener are text
    ("(x:1.3", [("x:1.3", 1.1)]),  # no ")" so no weight: the colon is text
    ("x:1.3)", [("x:1.3)", 1.0)]),  # a weight with no open "(" is text
    ("(a [b) c]", [("a ", 1.1), ("b", 1.1 * DOWN), (" c", DOWN)]),  # crossed brackets
    ("((a)", [("a", 1.1 * 1.1)]),
])
def test_emphasis_unbalanced(text, expected):
    assert parse_emphasis(text) == expected


def test_emphasis_bad_weight_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_emphasis("(x:1.2.3)")


def test_break_is_an_own_word_in_upper_case():
    assert parse_emphasis("a cat BREAK a dog") == [
        ("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_emphasis("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    assert parse_emphasis("a break b") == [("a break b", 1.0)]
    assert parse_emphasis("aBREAK b") == [("aBREAK b", 1.0)]
    assert parse_emphasis("a,BREAK,b") == [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]
    runs = parse_emphasis("(cat) BREAK [dog]")
    assert runs == [("cat", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("dog", DOWN)]
    assert [is_break(r) for r in runs] == [False, False, True, False, False]


def test_break_inside_brackets_is_scaled_and_so_no_break():
    runs = parse_emphasis("(a BREAK b)")
    assert runs == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    assert not any(is_break(r) for r in runs)


# ----------------------------------------------------------------- editing and alternation


@pytest.mark.parametrize("text, expected", [  # the WebUI's doctests, 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
])
def test_schedules_webui_doctests(text, expected):
    assert schedules(text, 10) == expected


def test_editing_from_to_and_remove():
    assert schedules("a [cat:dog:4] b", 10) == [(4, "a cat b"), (10, "a dog b")]
    assert schedules("a [cat::4] b", 10) == [(4, "a cat b"), (10, "a  b")]
    assert schedules("[a:b:2][c:d:3]", 10) == [(2, "ac"), (3, "bc"), (10, "bd")]


def test_integer_when_is_a_step_and_decimal_a_fraction():
    assert schedules("[a:b:1]", 10) == [(1, "a"), (10, "b")]
    assert schedules("[a:b:1.0]", 10) == [(10, "a")]  # the whole run
    assert schedules("[a:b:0.25]", 20) == [(5, "a"), (20, "b")]
    assert schedules("[a:b:0.26]", 20) == [(5, "a"), (20, "b")]  # int() truncates
    assert schedules("[a:b:30]", 10) == [(10, "a")]  # clamped to the steps
    assert schedules("[a:b:0]", 10) == [(10, "b")]  # never before: after from the start
    assert schedules("[a:b:-1]", 10) == [(10, "b")]


def test_hires_timeline_counts_on_from_the_first_pass():
    assert schedules("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert schedules("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert schedules("a [b:15] c", 10, hires_steps=8) == [(5, "a  c"), (8, "a b c")]


def test_alternation_every_step():
    assert schedules("[a|(b:1.1)]", 4) == [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]
    assert [t for _, t in schedules("[fe|]male", 4)] == ["female", "male"] * 2
    assert [t for _, t in schedules("[fe|||]male", 6)] == [
        "female", "male", "male", "male", "female", "male"]
    assert [t for _, t in schedules("[a|b|c]", 4)] == ["a", "b", "c", "a"]


def test_nesting_editing_alternation_and_emphasis():
    assert schedules("([cat:dog:0.5]:1.2)", 10) == [(5, "(cat:1.2)"), (10, "(dog:1.2)")]
    assert schedules("[[a|b]:c:3]", 4) == [(1, "a"), (2, "b"), (3, "a"), (4, "c")]
    assert schedules("[x [a:b:1] y|z]", 3) == [(1, "x a y"), (2, "z"), (3, "x b y")]
    assert schedules("[[a:b:2]]", 4) == [(2, "[a]"), (4, "[b]")]


@pytest.mark.parametrize("text", [
    "a | b",  # "|" outside an alternation: the WebUI takes the whole prompt literally
    "[a|b",
    "(a|b) [c:d:2]",
    "[a:b:c:1]",  # three parts before the number: not an edit
    "[a:b]",
    r"\[a:b:3\]",  # escaped brackets
    "[a (b:3]",  # an unclosed "(" inside brackets spoils the edit
    "trailing \\",
])
def test_text_the_grammar_rejects_stays_literal(text):
    assert schedules(text, 10) == [(10, text)]


def test_absurd_nesting_is_a_clear_error():
    assert schedules("(" * 100 + "x" + ")" * 100, 10) == [(10, "(" * 100 + "x" + ")" * 100)]
    with pytest.raises(ValueError, match="too deeply"):
        schedules("[" * 5000 + "x", 10)


def test_prompt_at_step_counts_like_the_webui_denoiser():
    # The WebUI's step counter starts at 0 and picks the first entry with end >= step.
    assert [prompt_at_step("[a|b]", s, 10) for s in range(6)] == ["a", "a", "b", "a", "b", "a"]
    assert [prompt_at_step("[a:b:3]", s, 10) for s in range(6)] == ["a"] * 4 + ["b"] * 2
    assert prompt_at_step("plain", 7, 10) == "plain"


# ------------------------------------------------------------------------ extra networks


def test_extra_networks_are_removed_and_listed_in_order():
    text, nets = extract_extra_networks("a cat <lora:detail:0.8>, <hypernet:anime:0.5> dog")
    assert text == "a cat ,  dog"  # only the tags go, as in the WebUI
    assert nets == [ExtraNetwork("lora", "detail", ("0.8",)),
                    ExtraNetwork("hypernet", "anime", ("0.5",))]


@pytest.mark.parametrize("tag, te, unet", [
    ("<lora:x>", 1.0, 1.0),
    ("<lora:x:0.8>", 0.8, 0.8),
    ("<lora:x:0.7:0.3>", 0.7, 0.3),
    ("<lora:x:0.8:te=0.5>", 0.5, 0.5),  # te= overrides, and the UNet follows it
    ("<lora:x:1:unet=0.2>", 1.0, 0.2),
    ("<lora:x:te=0.4:unet=0.6>", 0.4, 0.6),
    ("<lora:x:te=0.4:0.9>", 0.4, 0.4),  # te= wins over the first number, the UNet follows
    ("<lora:x:unet=0.6>", 1.0, 0.6),
    ("<lora:x:0.5:0.7:unet=0.2>", 0.5, 0.2),  # unet= wins over the second number
    ("<lyco:x:0.7>", 0.7, 0.7),
    ("<lyco:x:0.7:0.3>", 0.7, 0.3),
])
def test_lora_multipliers(tag, te, unet):
    """As the WebUI's extra_networks_lora.activate reads them: te = the first number, then
    te=; unet = the second number, else te, then unet=."""
    _, [net] = extract_extra_networks(tag)
    assert net.name == "x"
    assert net.multipliers() == (te, unet)
    assert net.network == "lora" and net.problem() is None
    assert net.lora_weight() == (te if te == unet else (te, unet))


def test_lyco_tags_are_lora_tags_kept_as_written():
    text, [net] = extract_extra_networks("a house <lyco:locon_x:0.6>")
    assert text == "a house "
    assert (net.kind, net.network, net.name) == ("lyco", "lora", "locon_x")
    _, [hn] = extract_extra_networks("<hypernet:h:0.5>")
    assert hn.network == "hypernet"


def test_lora_weight_is_one_number_when_both_parts_take_it():
    assert lora_weight(0.5, 0.5) == 0.5
    assert lora_weight(0.5, 1.0) == (0.5, 1.0)


@pytest.mark.parametrize("tag, fragment", [
    ("<lora:x:0.8:0.5:8>", "dyn"),  # the third number is the WebUI's dyn dim
    ("<lora:x:0.8:dyn=8>", "dyn"),
    ("<lyco:x:1:1:4>", "dyn"),
    ("<lora:x:strong>", "not a number"),
    ("<lora:x:te=a>", "not a number"),
    ("<lora:x:inf>", "finite"),
    ("<lora:x:nan:1>", "finite"),
    ("<hypernet:h:0.5:0.7>", "one strength"),
])
def test_tags_that_cannot_be_applied_say_why(tag, fragment):
    _, [net] = extract_extra_networks(tag)
    assert fragment in net.problem() and tag in net.problem()


def test_extra_network_arguments():
    _, [net] = extract_extra_networks("<lora:my-lora v2:0.8:te=0.5:dyn=4>")
    assert net.name == "my-lora v2"
    assert net.positional == ("0.8",)
    assert net.named == {"te": "0.5", "dyn": "4"}


@pytest.mark.parametrize("text", [
    "no tags here", "<not a tag>", "a <lora:x:1", "<lo-ra:x:1>", "(x:1.2) [a:b:3]", "<lora>",
])
def test_text_without_tags_is_unchanged(text):
    assert extract_extra_networks(text) == (text, [])


def test_adjacent_tags_and_tags_inside_syntax():
    text, nets = extract_extra_networks("<lora:a:1><lora:b:2>[x:<lora:c:1>y:3]")
    assert text == "[x:y:3]"
    assert [n.name for n in nets] == ["a", "b", "c"]


def test_split_and_reads_parts_and_weights_as_the_webui():
    from sdbatch.prompts.parser import split_and

    assert split_and("a cat") == [("a cat", 1.0)]
    assert split_and("a cat AND a dog :1.2") == [("a cat", 1.0), (" a dog", 1.2)]
    assert split_and("a cat:0.5 AND b:-1") == [("a cat", 0.5), (" b", -1.0)]
    assert split_and("ANDROID and x") == [("ANDROID and x", 1.0)]  # the word, upper case
    assert split_and("(x:1.2)") == [("(x:1.2)", 1.0)]  # an emphasis weight is not a part's
