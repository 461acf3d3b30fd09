"""Choosing a backend: names, addresses, MPMSUB_BACKEND, the CLI's options, and their errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpmsub
from mpmsub._backends import base as _backends
from mpmsub._backends.base import Node, largest_fit
from mpmsub._spec import JobSpec

MB = 2**20


def test_the_default_is_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPMSUB_BACKEND", raising=False)
    assert _backends.resolve(None).local
    assert _backends.resolve("local").local
    monkeypatch.setenv("MPMSUB_BACKEND", "local")
    assert _backends.resolve(None).local


def test_slurm_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backends.resolve("slurm://long?account=lab&workdir=/scratch/me&arg=--qos=high&arg=--exclusive")
    assert isinstance(backend, mpmsub.SlurmBackend)
    assert (backend.partition, backend.account, backend.workdir) == ("long", "lab", "/scratch/me")
    assert backend.extra_args == ("--qos=high", "--exclusive")
    plain = _backends.resolve("slurm")
    assert isinstance(plain, mpmsub.SlurmBackend) and plain.partition is None
    monkeypatch.setenv("MPMSUB_BACKEND", "slurm://short")
    chosen = _backends.resolve(None)
    assert isinstance(chosen, mpmsub.SlurmBackend) and chosen.partition == "short"


def test_dask_addresses() -> None:
    pytest.importorskip("distributed", reason="DaskBackend needs distributed: pip install 'mpmsub[dask]'")
    backend = _backends.resolve("dask://scheduler.example:8786")
    assert isinstance(backend, mpmsub.DaskBackend) and backend.address == "tcp://scheduler.example:8786"
    assert _backends.resolve("dask+tls://h:1").address == "tls://h:1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lcoal", "invalid backend 'lcoal'"),
        ("dask", "Dask needs its scheduler's address"),
        ("dask://", "'dask://HOST:PORT'"),
        ("dask://h:1/path", "'dask://HOST:PORT'"),
        ("slurm://p?acount=x", "unknown option 'acount'"),
        ("slurm://p/x", "'slurm://PARTITION"),
        ("http://h:1", "invalid backend 'http://h:1'"),
    ],
)
def test_bad_addresses_are_refused_naming_them(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        _backends.resolve(text)


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPMSUB_BACKEND", "sluurm")
    with pytest.raises(ValueError, match=r"invalid MPMSUB_BACKEND='sluurm'"):
        mpmsub.MemoryAwareExecutor()
    with pytest.raises(ValueError, match=r"invalid MPMSUB_BACKEND='sluurm'"):
        mpmsub.cluster()


@pytest.mark.parametrize("value", [3, b"local", ["slurm"], object()])
def test_backend_of_the_wrong_type(value: Any) -> None:
    with pytest.raises(TypeError, match="backend must be"):
        mpmsub.MemoryAwareExecutor(backend=value)


def test_slurm_backend_options_are_checked_at_once() -> None:
    with pytest.raises(TypeError, match=r"extra_args must be a list of strings.*'--qos=high'"):
        mpmsub.SlurmBackend(extra_args="--qos=high")
    with pytest.raises(TypeError, match="partition must be a non-empty string"):
        mpmsub.SlurmBackend(partition="")
    with pytest.raises(ValueError, match="invalid max_poll 0"):
        mpmsub.SlurmBackend(max_poll=0)


def test_dask_backend_takes_an_address_or_a_client() -> None:
    pytest.importorskip("distributed", reason="DaskBackend needs distributed: pip install 'mpmsub[dask]'")
    with pytest.raises(TypeError, match=r"scheduler's address .* or a distributed.Client; got 8786"):
        mpmsub.DaskBackend(8786)
    with pytest.raises(ValueError, match="invalid timeout -1"):
        mpmsub.DaskBackend("tcp://h:1", timeout=-1)


def test_memory_reserve_is_refused_with_a_remote_backend() -> None:
    class Elsewhere(_backends.Backend):
        def launcher(self, options: Any) -> Any:
            raise AssertionError("not reached")

        def capacity(self) -> Any:
            return (4, 4096 * MB)

    with pytest.raises(ValueError, match="memory_reserve='1G' applies to local runs only"):
        mpmsub.MemoryAwareExecutor(memory_reserve="1G", backend=Elsewhere())


nodes = st.lists(
    st.builds(Node, st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 64), st.integers(0, 1 << 40)), max_size=5
)


@given(nodes, st.integers(1, 64), st.one_of(st.none(), st.integers(0, 1 << 40)), st.integers(0, 1 << 30))
def test_largest_fit_refuses_exactly_what_no_single_node_holds(
    places: Any, cpus: int, memory: Any, overhead: int
) -> None:
    spec = JobSpec(stages=(("true",),), cpus=cpus, memory=memory)
    need = 0 if spec.memory is None else spec.memory + overhead
    holds = any(node.cpus >= cpus and node.memory >= need for node in places)
    why = largest_fit(spec, places, "node", overhead)
    assert (why is None) == holds
    if why is not None and places:
        assert f"needs {cpus} CPU" in why and "offers" in why


def test_cli_backend_options_are_checked(tmp_path: Any) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("true\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mpmsub", "run", str(jobs), "-q", *args], capture_output=True, text=True, timeout=60
        )

    done = cli("--backend", "dask")
    assert done.returncode == 2 and "--backend dask needs the scheduler's address" in done.stderr
    done = cli("--backend", "local", "--partition", "p")
    assert done.returncode == 2 and "--partition is an option of the slurm backend" in done.stderr
    done = cli("--backend", "nowhere")
    assert done.returncode == 2 and "invalid backend 'nowhere'" in done.stderr
    assert cli("--backend", "local").returncode == 0


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)


@given(names, st.one_of(st.none(), names), st.lists(names.map(lambda n: f"--qos={n}"), max_size=3))
def test_slurm_addresses_carry_their_options(partition: str, account: Any, args: Any) -> None:
    query = "&".join([*([f"account={account}"] if account else []), *(f"arg={a}" for a in args)])
    backend = _backends.resolve(f"slurm://{partition}" + (f"?{query}" if query else ""))
    assert isinstance(backend, mpmsub.SlurmBackend)
    assert (backend.partition, backend.account, backend.extra_args) == (partition, account, tuple(args))


@given(st.text(max_size=30))
def test_any_text_is_a_backend_or_a_clear_error(text: str) -> None:
    try:
        backend = _backends.resolve(text)
    except ValueError as exc:
        assert repr(text) in str(exc) or "DaskBackend" in str(exc)
    except (ImportError, TypeError) as exc:  # DaskBackend without distributed; SlurmBackend's checks
        assert "distributed" in str(exc) or "must be" in str(exc)
    else:
        assert isinstance(backend, _backends.Backend)
