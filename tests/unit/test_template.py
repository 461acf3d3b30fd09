"""Command templates and input sources as pure functions, checked against GNU parallel's rules."""

from __future__ import annotations

import itertools
import shlex
import subprocess
from typing import Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpmsub._cli.template import TemplateError, dirname, expand, is_template, parse, quote, transform

value_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)


def no_files(name: str) -> bytes:
    raise FileNotFoundError(2, "No such file or directory", name)


def jobs(*words: str, files: Dict[str, bytes] = {}, null: bool = False) -> List[str]:  # noqa: B006
    def read(name: str) -> bytes:
        if name not in files:
            no_files(name)
        return files[name]

    template = parse(words, read, null=null)
    return [template.expand(values, seq) for seq, values in enumerate(template.jobs(), 1)]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{}", "a.b/c.d.txt"),
        ("{.}", "a.b/c.d"),
        ("{/}", "c.d.txt"),
        ("{//}", "a.b"),
        ("{/.}", "c.d"),
        ("{#}", "1"),
        ("{1}", "a.b/c.d.txt"),
        ("{1.}", "a.b/c.d"),
        ("{1/}", "c.d.txt"),
        ("{1//}", "a.b"),
        ("{1/.}", "c.d"),
    ],
)
def test_each_replacement_string(template: str, expected: str) -> None:
    assert jobs("echo", template, ":::", "a.b/c.d.txt") == [f"echo {expected}"]


@pytest.mark.parametrize(
    ("value", "no_ext", "base", "directory"),
    [
        ("a.b/c", "a.b/c", "c", "a.b"),
        ("plain", "plain", "plain", "."),
        (".hidden", "", ".hidden", "."),
        ("/abs/f.txt", "/abs/f", "f.txt", "/abs"),
        ("/f", "/f", "f", "/"),
        ("a/", "a/", "", "."),
        ("x//y.tar.gz", "x//y.tar", "y.tar.gz", "x"),
        ("/", "/", "", "/"),
    ],
)
def test_paths_are_cut_as_gnu_parallel_cuts_them(value: str, no_ext: str, base: str, directory: str) -> None:
    assert (transform(value, "."), transform(value, "/"), dirname(value)) == (no_ext, base, directory)


def test_several_sources_give_every_combination_the_first_varying_slowest() -> None:
    assert jobs("echo", ":::", "a", "b", ":::", "1", "2") == ["echo a 1", "echo a 2", "echo b 1", "echo b 2"]
    assert jobs("echo {2}-{1} {}", ":::", "a", ":::", "1") == ["echo 1-a a 1"]


def test_linked_sources_pair_values_by_position() -> None:
    assert jobs("echo", ":::", "a", "b", ":::", "x", "y", ":::+", "1", "2") == [
        "echo a x 1",
        "echo a y 2",
        "echo b x 1",
        "echo b y 2",
    ]
    files = {"f": b"1\n2\n"}
    assert jobs("echo {1}{2}", ":::", "a", "b", "::::+", "f", files=files) == ["echo a1", "echo b2"]


def test_file_sources_are_lines_or_nul_separated_values() -> None:
    assert jobs("echo", "::::", "f", files={"f": b"x\n\ny z\n"}) == ["echo x", "echo ''", "echo 'y z'"]
    assert jobs("echo", "::::", "f", "g", files={"f": b"1\n", "g": b"2"}) == ["echo 1 2"]
    assert jobs("echo", "::::", "-", files={"-": b"a\nb\0c\0"}, null=True) == ["echo 'a\nb'", "echo c"]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["echo", ":::"], "the input source ::: is empty"),
        (["echo", "::::", "missing"], "cannot read the input source 'missing'"),
        (["echo", "::::", "empty"], "the input source 'empty' is empty"),
        (["echo {3}", ":::", "a", ":::", "b"], "invalid replacement string '{3}'"),
        (["echo {0}", ":::", "a"], "invalid replacement string '{0}'"),
        (["echo", ":::", "a\0b"], "holds a NUL byte"),
        (["echo", ":::+", "a"], "links to the input source before it"),
        (["echo", ":::", "a", ":::+", "1", "2"], "differ in length (1 and 2 values)"),
    ],
)
def test_bad_templates_and_sources_are_errors_naming_them(words: List[str], message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        jobs(*words, files={"empty": b""})
    assert message in str(caught.value)


def test_a_template_is_only_one_with_a_separator() -> None:
    assert is_template(["echo", ":::+", "a"]) and not is_template(["jobs.txt"])


@given(value_text)
def test_a_quoted_value_is_one_shell_word(value: str) -> None:
    assert shlex.split(quote(value)) == [value]


@given(st.lists(st.lists(value_text, min_size=1, max_size=3), min_size=1, max_size=3))
def test_every_combination_is_one_job_in_order_with_the_values_appended(sources: List[List[str]]) -> None:
    words = ["printf %s"] + [w for values in sources for w in (":::", *values)]
    commands = jobs(*words)
    combos = list(itertools.product(*sources))
    assert len(commands) == len(combos)
    for command, combo in zip(commands, combos):
        assert shlex.split(command) == ["printf", "%s", *combo]


@given(value_text, st.integers(1, 10**6))
def test_replacement_strings_substitute_one_quoted_word(value: str, seq: int) -> None:
    assert shlex.split(expand("x{}y {#}", [value], seq)) == [f"x{value}y", str(seq)]


needs_parallel = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v parallel"], capture_output=True).returncode != 0,
    reason="GNU parallel is not installed",
)


@needs_parallel
@pytest.mark.parametrize(
    "words",
    [
        ["echo {} {.} {/} {//} {/.} {#}", ":::", "a.b/c", "x/y.tar.gz", "plain", ".hidden", "/abs/f.txt", "a/"],
        ["echo", ":::", "a b", "it's", "x$y", "é", "", "a+b", "a@b", "~x", "*", '"q"', "a\\b"],
        ["echo", ":::", "a'", "'a", "''", "'", "a'b'"],
        ["echo {2} {1}", ":::", "a", "b", ":::", "1 2", "3"],
        ["echo", ":::", "a", "b", ":::", "x", "y", ":::+", "1", "2"],
        ["echo {1.} {2/} {1//}", ":::", "d/a.x", ":::", "e/f.g"],
        # No command: the values are the commands (parallel's "cat | sh"), unquoted.
        [":::", "echo 'a b'", "ls; true", "echo $HOME"],
        [":::", "echo", "printf '%s\\n'", ":::", "a b", "c"],
        # A command that starts with a replacement string has none quoted; a space before it does.
        ["{} {}", ":::", "echo 'a b'"],
        ["{2} {1}", ":::", "x y", ":::", "echo"],
        ["{.} x", ":::", "echo a.b"],
        [" {}", ":::", "echo 'a b'"],
        ["{#} {}", ":::", "a b"],
    ],
)
def test_the_commands_are_those_gnu_parallel_runs(words: List[str]) -> None:
    theirs = subprocess.run(["parallel", "-k", "--dry-run", *words], capture_output=True, check=True)
    assert "\n".join(jobs(*words)) + "\n" == theirs.stdout.decode()
