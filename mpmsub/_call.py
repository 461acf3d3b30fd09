"""Python calls as jobs: `Call(fn, *args, **kwargs)` with the resources of a Job, and the
pickled form a worker process receives.

A call is pickled once, when it is submitted, so that what cannot be pickled fails its own
future at once with a message naming the culprit (the function, which argument, which item).
"""

from __future__ import annotations

import dataclasses
import pickle
import reprlib
import sys
from typing import Any, Callable, Dict, Generic, Iterable, List, Optional, Sequence, Tuple, TypeVar

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

from mpmsub._errors import CallPicklingError
from mpmsub._job import Resources
from mpmsub._protocol import CALL, CHUNK  # a worker's frame kinds
from mpmsub._spec import JobSpec
from mpmsub._units import MemoryLike

T = TypeVar("T")
P = ParamSpec("P")


_repr = reprlib.Repr()
_repr.maxstring = 24
_repr.maxother = 24
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 3


def function_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"expected a function (or any callable) to run; got {fn!r} ({type(fn).__name__})")


class CallPayload:
    """A call's function and arguments, and their pickle (made on first use and kept)."""

    __slots__ = ("_data", "_description", "args", "first", "fn", "kind", "kwargs")

    def __init__(
        self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any], chunk: bool, first: int = 0
    ) -> None:
        self.fn = fn
        self.first = first  # a chunk's: the index of its first item in all of map()'s items
        self.args = args
        self.kwargs = kwargs
        self.kind = CHUNK if chunk else CALL
        self._data: Optional[bytes] = None
        self._description: Optional[str] = None

    @property
    def description(self) -> str:
        """The call in words, for results and messages: 'fn(1, 'a', key=2)', 'fn over 200 items'."""
        if self._description is None:
            name = function_name(self.fn)
            args = self.args
            if self.kind == CHUNK:
                last = self.first + len(args) - 1
                span = f"item {last}" if len(args) == 1 else f"items {self.first}-{last}"
                self._description = f"{name} over {span}"
            else:
                shown = [_repr.repr(a) for a in args] + [f"{k}={_repr.repr(v)}" for k, v in self.kwargs.items()]
                self._description = f"{name}({', '.join(shown)})"
        return self._description

    def data(self) -> bytes:
        """The frame body a worker runs: kind byte and pickle. Raises CallPicklingError naming
        what could not be pickled."""
        if self._data is None:
            body = (self.fn, self.args) if self.kind == CHUNK else (self.fn, self.args, self.kwargs)
            try:
                self._data = self.kind + pickle.dumps(body, pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                what, hint = self._culprit()
                raise CallPicklingError(
                    f"cannot send the call {self.description} to a worker: {what} could not be pickled "
                    f"({type(exc).__name__}: {exc}){hint}"
                ) from exc
        return self._data

    def portable(self) -> CallPayload:
        """This call for another machine: pickled by value with cloudpickle where it is installed
        (a function of the user's script then runs where that script is not), else as `data()`.
        Raises CallPicklingError as `data()` does."""
        try:
            import cloudpickle  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            self.data()
            return self
        body = (self.fn, self.args) if self.kind == CHUNK else (self.fn, self.args, self.kwargs)
        try:
            data = self.kind + cloudpickle.dumps(body, pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = self.data()  # names the culprit, or, if plain pickle copes, is what is sent
        return _received(data, self.description, self.kind, self.first)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        # Sent as its pickle (made once), with its description: what a worker elsewhere needs.
        return _received, (self.data(), self.description, self.kind, self.first)

    def _culprit(self) -> Tuple[str, str]:
        """The first part of the call that does not pickle, in words, and a hint."""
        fn = self.fn
        if not _pickles(fn):
            name = function_name(fn)
            hint = ""
            if "<lambda>" in name or "<locals>" in name:
                hint = "; workers run functions defined at the top level of a module, not lambdas or nested functions"
            return f"the function {name!r}", hint
        for index, arg in enumerate(self.args):
            if not _pickles(arg):
                if self.kind == CHUNK:
                    return f"item {self.first + index} of the iterables ({_repr.repr(arg)})", ""
                return f"argument {index} ({type(arg).__name__} {_repr.repr(arg)})", ""
        for key, value in self.kwargs.items():
            if not _pickles(value):
                return f"keyword argument {key!r} ({type(value).__name__} {_repr.repr(value)})", ""
        return "the call", ""


def _received(data: bytes, description: str, kind: bytes, first: int) -> CallPayload:
    """A call as another process receives it: its pickle and description, not its objects."""
    payload = CallPayload(None, (), {}, kind == CHUNK, first)  # type: ignore[arg-type]
    payload._data = data
    payload._description = description
    return payload


def _pickles(value: object) -> bool:
    try:
        pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return False
    return True


class Call(Resources, Generic[T]):
    """A Python function call and what it needs, run in a worker process by an executor:
    `ex.submit(Call(fn, x, y=2).cpu(2).memory("1G").with_timeout(60))`.

    It takes the builder methods of `Job` (`cpu`, `memory`, `with_timeout`, `with_id`,
    `with_retries`, `strict_memory`, `with_priority`); a call without `m` reserves no memory. The
    function and its arguments must be picklable (as for ProcessPoolExecutor): functions defined
    at the top level of a module, not lambdas or nested functions.
    """

    def __init__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> None:
        check_callable(fn)
        super().__init__()
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def _payload(self) -> CallPayload:
        return CallPayload(self.fn, self.args, self.kwargs, chunk=False)

    def spec(self) -> JobSpec:
        return JobSpec(stages=(), call=self._payload(), **self._spec_fields())

    def _chunk_spec(self, items: List[Tuple[Any, ...]], first: int) -> JobSpec:
        """The spec of a chunk of map(): `fn` called on each tuple of `items` in turn; `first` is
        the index of its first item among all of map()'s."""
        return dataclasses.replace(self.spec(), call=CallPayload(self.fn, items, {}, chunk=True, first=first))

    def __repr__(self) -> str:
        fields = f", p={self.p}, m={self.m!r}" + (f", id={self.id!r}" if self.id is not None else "")
        return f"Call({self._payload().description}{fields})"


def chunks(iterables: Iterable[Iterable[Any]], size: int) -> Iterable[List[Tuple[Any, ...]]]:
    """zip(*iterables) in lists of `size` tuples (the last may be shorter)."""
    items = zip(*iterables)
    while True:
        chunk = [args for _, args in zip(range(size), items)]
        if not chunk:
            return
        yield chunk


def map_call(fn: Callable[..., Any], cpus: Optional[int], memory: Optional[MemoryLike]) -> Call[Any]:
    """The template of map()'s chunks: validated at once, before any item is read."""
    call: Call[Any] = Call(fn)
    if cpus is not None:
        call.cpu(cpus)
    if memory is not None:
        call.memory(memory)
    call._spec_fields()
    return call
