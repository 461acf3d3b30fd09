"""What `m="auto"` learns from: a job's key, the size of its input files, and the estimate of
its peak memory from past runs of the same key. Pure functions (the input size reads the file
system, nothing else does I/O).

The key rule (documented in docs/auto-memory.md):

- the program is the base name of its path (``/usr/bin/bwa`` is ``bwa``; ``python3.11`` is
  ``python``); for an interpreter (python, Rscript, perl, java, ...) the first argument that
  is not an option, its script, is part of the program (``python align.py``), by base name;
- a shell's ``-c`` script is split into words and normalised by the same rule;
- options are kept, with the numbers in them written ``#`` (``-t8`` is ``-t#``, ``-9`` is ``-#``); an option's
  ``=value`` is normalised as an argument;
- a number (``8``, ``0.5``, ``4G``) is ``#``;
- a path (an argument with a ``/``, one that names an existing file or directory, or a name
  with a file extension) is ``*`` followed by its extension (``reads_1.fq.gz`` is ``*.fq.gz``);
- other words (subcommands such as ``mem`` or ``sort``) are kept;
- a pipeline's key is its stages' keys joined by `` | ``; a Python call's is ``call:`` and the
  function's module and name.

So ``bwa mem -t 8 ref.fa s1.fq`` and ``/opt/bin/bwa mem -t 4 ref.fa s2.fq`` share the key
``bwa mem -t # *.fa *.fq``. `Job.with_key()` names a key outright.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from mpmsub._protocol import CHUNK
from mpmsub._spec import JobSpec

# -- keys -------------------------------------------------------------------------------------

_INTERPRETERS = {
    "python",
    "pypy",
    "rscript",
    "r",
    "perl",
    "ruby",
    "node",
    "julia",
    "java",
    "php",
    "lua",
    "tclsh",
    "bash",
    "sh",
    "dash",
    "zsh",
    "ksh",
}
_SHELLS = {"bash", "sh", "dash", "zsh", "ksh"}
_VERSIONED = re.compile(r"^(python|pypy|perl|ruby|node|php|lua)[\d.]*$", re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?([kmgtp]i?b?|b|%|x)?$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+(\.\d+)?")
# An extension: a dot, then a letter and up to nine letters or digits, at the end of a name.
_EXTENSION = re.compile(r"\.([A-Za-z][A-Za-z0-9]{0,9})$")
_COMPRESSION = {"gz", "bz2", "xz", "zst", "lz4", "zip", "bgz"}
_MAX_ARG = 4096  # longer arguments are data, not names: neither stat'ed nor kept in the key
# A shell script is keyed by its first this many characters: shlex's time grows with the square
# of a token's length (1 MB took 12 s), and a key is for telling tools apart, not for data.
_MAX_SCRIPT = 16384


def program(arg0: str) -> str:
    """The program's name: the base name of its path, an interpreter's version dropped."""
    name = os.path.basename(arg0.rstrip("/")) or arg0
    versioned = _VERSIONED.match(name)
    return versioned.group(1).lower() if versioned else name


def extension(name: str) -> str:
    """A file name's extension, with a compression's kept beside the one under it ('.fq.gz')."""
    base = os.path.basename(name.rstrip("/"))
    found = _EXTENSION.search(base)
    if not found:
        return ""
    ext = found.group(0)
    if found.group(1).lower() in _COMPRESSION:
        inner = _EXTENSION.search(base[: found.start()])
        if inner:
            ext = inner.group(0) + ext
    return ext


def _exists(arg: str, cwd: Optional[str]) -> bool:
    try:
        os.stat(arg if cwd is None else os.path.join(cwd, arg))
    except (OSError, ValueError):
        return False
    return True


def _word(arg: str, cwd: Optional[str]) -> str:
    """One argument, normalised."""
    if len(arg) > _MAX_ARG:
        return "…"
    if arg.startswith("-") and len(arg) > 1:  # an option (a negative number reads as one too)
        option, eq, value = arg.partition("=")
        option = _DIGITS.sub("#", option)
        return f"{option}={_word(value, cwd)}" if eq else option
    if _NUMBER.match(arg):
        return "#"
    if "/" in arg or _EXTENSION.search(arg) or (arg and _exists(arg, cwd)):
        return "*" + extension(arg)
    return arg


def _stage(argv: Sequence[str], cwd: Optional[str], depth: int = 0) -> Tuple[List[str], List[str]]:
    """A command's key words, and the arguments that may name its input files (all but the
    program, an interpreter's script and options, whose =values count)."""
    name = program(argv[0])
    words, inputs = [name], []
    rest = list(argv[1:])
    if name.lower() in _SHELLS and "-c" in rest and depth < 3:
        at = rest.index("-c")
        words += [_word(arg, cwd) for arg in rest[:at]] + ["-c"]
        if at + 1 < len(rest):
            more, found = _script(rest[at + 1], cwd, depth + 1)
            words += more
            inputs += found
        return words, inputs
    script_seen = name.lower() not in _INTERPRETERS
    for index, arg in enumerate(rest):
        code = index > 0 and rest[index - 1] == "-c"
        if not script_seen and (code or not arg.startswith("-")):
            # The script (or `-c` code) is part of the program, by its base name.
            words.append("…" if len(arg) > _MAX_ARG else arg if code else os.path.basename(arg))
            script_seen = True
            continue
        words.append(_word(arg, cwd))
        inputs.append(arg.partition("=")[2] if arg.startswith("-") else arg)
    return words, inputs


_OPERATORS = ("|", "||", "&&", ";", "&")
_REDIRECTS = (">", ">>", "1>", "2>", "&>", "2>>", "1>>")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _script(script: str, cwd: Optional[str], depth: int) -> Tuple[List[str], List[str]]:
    """A shell script's key words and input arguments: each command of it as a command of its
    own; variable assignments before a command and the files it writes to are not inputs."""
    cut = len(script) > _MAX_SCRIPT
    if cut:
        script = script[:_MAX_SCRIPT]
    try:
        tokens = shlex.split(script, comments=True)
    except ValueError:  # unbalanced quotes (the shell would refuse it too), or a script cut short
        tokens = script.split()
    if cut:
        tokens.append("…")  # what follows, unread
    words: List[str] = []
    inputs: List[str] = []
    command: List[str] = []

    def flush() -> None:
        while command and _ASSIGNMENT.match(command[0]):
            variable, _, value = command.pop(0).partition("=")
            words.append(f"{variable}={_word(value, cwd)}")
        if command:
            more, found = _stage(command, cwd, depth)
            words.extend(more)
            written = {arg for i, arg in enumerate(command[1:]) if command[i] in _REDIRECTS}
            inputs.extend(arg for arg in found if arg not in written and arg not in _REDIRECTS)
        command.clear()

    for token in tokens:
        if token in _OPERATORS:
            flush()
            words.append(token)
        else:
            command.append(token)
    flush()
    return words, inputs


def key_and_input(spec: JobSpec) -> Tuple[str, int]:
    """The key runs of the same tool share (see the module's docstring; `spec.key` if given), and
    the total size in bytes of the existing regular files the job's arguments name (relative
    names taken from its working directory, each file counted once): the command read once."""
    call = spec.call
    if call is not None:
        fn = call.fn
        module = getattr(fn, "__module__", None) or ""
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        key = f"call:{module}.{name}" if module else f"call:{name}"
        if call.kind == CHUNK:
            size = _chunk_size(call.args, spec.cwd)
        else:
            size = _total_size(_call_paths([*call.args, *call.kwargs.values()]), spec.cwd)
    else:
        keys, inputs = [], []
        for stage in spec.stages:
            words, found = _stage(stage, spec.cwd)
            keys.append(" ".join(words))
            inputs += found
        key, size = " | ".join(keys), _total_size(inputs, spec.cwd)
    return _text(key if spec.key is None else spec.key), size


def _text(key: str) -> str:
    """A key as valid UTF-8, which the history's database takes: the surrogates that stand for
    the bytes of a name that is not UTF-8 (as Python reads such names) written as escapes."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def job_key(spec: JobSpec) -> str:
    return key_and_input(spec)[0]


def input_size(spec: JobSpec) -> int:
    return key_and_input(spec)[1]


# -- input size -------------------------------------------------------------------------------


def _call_paths(values: Iterable[Any]) -> Iterator[str]:
    """A call's arguments that may name files: its strings and paths."""
    for value in values:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            yield value


def _chunk_size(items: Sequence[Tuple[Any, ...]], cwd: Optional[str]) -> int:
    """A map() chunk's input: the largest of its items' (they run one after another). Items of
    one map are alike: if the first names no path (numbers, say), none is looked at."""
    if not items or not any(isinstance(v, (str, os.PathLike)) for v in items[0]):
        return 0
    return max(_total_size(_call_paths(item), cwd) for item in items)


def _total_size(args: Iterable[str], cwd: Optional[str]) -> int:
    total = 0
    seen: Set[str] = set()
    for arg in args:
        if not 0 < len(arg) <= _MAX_ARG:
            continue
        path = arg if cwd is None else os.path.join(cwd, arg)
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(info.st_mode):
            ident = f"{info.st_dev}:{info.st_ino}"
            if ident not in seen:
                seen.add(ident)
                total += info.st_size
    return total
