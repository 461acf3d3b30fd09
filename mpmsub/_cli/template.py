"""Command templates and input sources, as GNU parallel takes them on its command line.

`COMMAND [WORDS...] ::: VALUES... :::: FILES... :::+ VALUES... ::::+ FILES...`: each separator
starts an input source; several sources give every combination (the first varying slowest),
and a `+` source is linked to the one before it (paired by position). Replacement strings are
GNU parallel's: `{}` `{.}` `{/}` `{//}` `{/.}` `{#}` and `{N}` `{N.}` `{N/}` `{N//}` `{N/.}`;
values are shell-quoted where they are substituted, as parallel quotes them, except in a command
that starts with a replacement string (none is quoted there), and without a command the values
are the commands (as `{}`: parallel's "cat | sh"). Pure: reading a `::::` file is the caller's
`read` function.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from mpmsub._errors import MpmsubError

VALUES, FILES, LINKED_VALUES, LINKED_FILES = ":::", "::::", ":::+", "::::+"
SEPARATORS = (VALUES, FILES, LINKED_VALUES, LINKED_FILES)
STDIN = "-"

# {}, {.}, {/}, {//}, {/.}, {#}, and each of the first five with a source's number.
_REPLACEMENT = re.compile(r"\{(#|(\d*)(\.|/|//|/\.)?)\}")
_SAFE = re.compile(r"[-_.+a-zA-Z0-9/]+")  # what GNU parallel leaves unquoted


class TemplateError(MpmsubError, ValueError):
    """A template or input source that cannot be run: names the bad value."""


@dataclass(frozen=True)
class Source:
    """One input source: its values, and whether it is linked to the source before it."""

    name: str  # how messages name it: "::: a b" or ":::: FILE"
    values: Tuple[str, ...]
    linked: bool = False


@dataclass(frozen=True)
class Template:
    """A command template and its input sources."""

    command: str  # the command's words joined by spaces, as GNU parallel joins them
    sources: Tuple[Source, ...]

    def jobs(self) -> List[Tuple[str, ...]]:
        """Each job's values, one per source, in GNU parallel's order."""
        groups: List[List[Source]] = []
        for source in self.sources:
            if source.linked and groups:
                groups[-1].append(source)
            else:
                groups.append([source])
        rows = [list(zip(*(s.values for s in group))) for group in groups]
        return [tuple(v for part in combo for v in part) for combo in itertools.product(*rows)]

    def expand(self, values: Sequence[str], seq: int) -> str:
        """The shell command of the job with these values and sequence number (from 1)."""
        return expand(self.command, values, seq)


def is_template(words: Sequence[str]) -> bool:
    """Whether command-line words hold an input source separator."""
    return any(word in SEPARATORS for word in words)


def parse(
    words: Sequence[str],
    read: Callable[[str], bytes],
    arg_files: Sequence[str] = (),
    null: bool = False,
) -> Template:
    """The template of `COMMAND [WORDS...] SEP VALUES... [SEP VALUES...]...`. `read(name)` gives
    a `::::` file's bytes ("-" is standard input); `arg_files` are sources given as `-a FILE`
    (before the others); `null` splits file sources at NUL bytes instead of newlines."""
    cut = next((i for i, word in enumerate(words) if word in SEPARATORS), len(words))
    command = " ".join(words[:cut])
    if not command.strip():
        command = "{}"  # no command: each job's values are its command, unquoted (parallel ::: CMDS)
    sources: List[Source] = [_file_source(name, read, null, False) for name in arg_files]
    groups: List[Tuple[str, List[str]]] = []
    for word in words[cut:]:
        if word in SEPARATORS:
            groups.append((word, []))
        else:
            groups[-1][1].append(word)
    for separator, args in groups:
        linked = separator.endswith("+")
        if not args:
            raise TemplateError(f"the input source {separator} is empty: give values after it")
        if linked and not sources:
            raise TemplateError(f"{separator} links to the input source before it, and there is none")
        if separator in (VALUES, LINKED_VALUES):
            sources.append(Source(f"{separator} {' '.join(args)}", tuple(_checked(args, separator)), linked))
        else:
            for i, name in enumerate(args):
                sources.append(_file_source(name, read, null, linked and i == 0))
    if not sources:
        raise TemplateError("no input source: give one with ::: VALUES, :::: FILE or -a FILE")
    _check_links(sources)
    _check_replacements(command, len(sources))
    return Template(command, tuple(sources))


def _file_source(name: str, read: Callable[[str], bytes], null: bool, linked: bool) -> Source:
    label = "standard input" if name == STDIN else repr(name)
    try:
        data = read(name)
    except OSError as exc:
        raise TemplateError(f"cannot read the input source {label}: {exc.strerror}") from None
    text = data.decode("utf-8", "surrogateescape")
    end = "\0" if null else "\n"
    values = text.split(end)
    if values[-1] == "":  # the last value's terminator
        values.pop()
    if not values:
        raise TemplateError(f"the input source {label} is empty")
    return Source(f":::: {name}", tuple(_checked(values, label)), linked)


def _checked(values: Sequence[str], where: str) -> List[str]:
    for value in values:
        if "\0" in value:
            raise TemplateError(f"the value {value!r} of {where} holds a NUL byte, which a command cannot take")
    return list(values)


def _check_links(sources: Sequence[Source]) -> None:
    for before, source in zip(sources, sources[1:]):
        if source.linked and len(source.values) != len(before.values):
            raise TemplateError(
                f"the linked input sources {before.name[:60]!r} and {source.name[:60]!r} differ in length "
                f"({len(before.values)} and {len(source.values)} values): linked values are paired by position"
            )


def _check_replacements(command: str, count: int) -> None:
    for match in _REPLACEMENT.finditer(command):
        number = match.group(2)
        if number and not 1 <= int(number) <= count:
            raise TemplateError(
                f"invalid replacement string {match.group(0)!r}: there are {count} input source(s), "
                f"so N in {{N}} is 1 to {count}"
            )


def has_replacement(command: str) -> bool:
    return _REPLACEMENT.search(command) is not None


def expand(command: str, values: Sequence[str], seq: int) -> str:
    """`command` with its replacement strings filled in; with none, the values appended. As in
    GNU parallel, a command that starts with a replacement string has none of them quoted: the
    values are (the start of) the command."""
    if not has_replacement(command):
        return " ".join([command, *(quote(v) for v in values)])
    quoted = _REPLACEMENT.match(command) is None

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "#":
            return str(seq)
        number, how = match.group(2), match.group(3)
        chosen = [values[int(number) - 1]] if number else list(values)
        return " ".join(quote(transform(v, how)) if quoted else transform(v, how) for v in chosen)

    return _REPLACEMENT.sub(replace, command)


def transform(value: str, how: Optional[str]) -> str:
    """A value as a replacement string gives it: `how` is None, ".", "/", "//" or "/."."""
    if how == ".":
        return _no_extension(value)
    if how == "/":
        return _basename(value)
    if how == "//":
        return dirname(value)
    if how == "/.":
        return _no_extension(_basename(value))
    return value


def _no_extension(value: str) -> str:
    return re.sub(r"\.[^/.]*\Z", "", value)


def _basename(value: str) -> str:
    return re.sub(r"\A.*/", "", value, flags=re.DOTALL)


def dirname(value: str) -> str:
    """A path's directory as Perl's File::Basename::dirname (which GNU parallel uses) gives it:
    "." for a bare name, "/" for the root."""
    if value and value.strip("/") == "":
        return "/"
    stripped = value.rstrip("/")
    if "/" not in stripped:
        return "."
    head = stripped[: stripped.rindex("/")].rstrip("/")
    return head or "/"


def quote(value: str) -> str:
    """A value as one shell word, quoted as GNU parallel quotes it."""
    if _SAFE.fullmatch(value):
        return value
    quoted = "'" + value.replace("'", "'\"'\"'") + "'"
    # As parallel: no empty '' left at either end by a quote there ("a'" is 'a'"'", not 'a'"'"'').
    if value.startswith("'"):
        quoted = quoted[2:]
    if value.endswith("'"):
        quoted = quoted[:-2]
    return quoted


def values_text(values: Sequence[str]) -> str:
    """A job's values as --tag prints them: separated by spaces."""
    return " ".join(values)
