"""mixprec.machine: CPU facts and the one shared thread pool."""

from __future__ import annotations

import threading

import pytest
import torch

from mixprec import machine


def test_cpu_flags_and_capability() -> None:
    flags = machine.cpu_flags()
    assert isinstance(flags, frozenset)
    assert machine.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    line = machine.summary()
    assert f"capability {machine.cpu_capability()}" in line
    assert f"torch {torch.__version__}" in line
    assert machine.cpu_vendor() in line


def test_cpu_vendor_is_cpuinfo_vendor_id(tmp_path, monkeypatch) -> None:
    """The vendor labels benchmark lines and keys recorded float results (MKL picks its GEMM
    kernels by vendor): /proc/cpuinfo's vendor_id, else platform.processor()."""
    real_open = open
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    machine.cpu_vendor.cache_clear()
    machine.cpu_flags.cache_clear()
    try:
        assert machine.cpu_vendor() == "AuthenticAMD"
        assert machine.cpu_flags() == frozenset({"fpu", "avx2"})
        cpuinfo.write_text("processor\t: 0\n")
        machine.cpu_vendor.cache_clear()
        monkeypatch.setattr(machine.platform, "processor", lambda: "arm")
        assert machine.cpu_vendor() == "arm"
    finally:
        machine.cpu_vendor.cache_clear()
        machine.cpu_flags.cache_clear()


def test_run_parallel_runs_every_task_on_pool_threads() -> None:
    seen: dict[int, str] = {}
    tasks = [lambda k=k: seen.__setitem__(k, threading.current_thread().name) for k in range(4)]
    machine.run_parallel(tasks)
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(name.startswith("mixprec") for name in seen.values())


def test_nested_run_parallel_runs_inline_instead_of_waiting_on_itself() -> None:
    inner: list[str] = []

    def outer_task() -> None:
        outer = threading.current_thread().name
        machine.run_parallel([lambda: inner.append(threading.current_thread().name)] * 3)
        assert inner[-3:] == [outer] * 3  # inline, in the calling pool thread

    done = threading.Event()
    threading.Thread(
        target=lambda: (machine.run_parallel([outer_task] * 2), done.set()), daemon=True
    ).start()
    assert done.wait(30), "nested run_parallel deadlocked"
    assert len(inner) == 6


def test_first_exception_propagates_after_all_tasks_ran() -> None:
    ran: list[int] = []

    def fail(k: int) -> None:
        ran.append(k)
        raise ValueError(f"task {k}")

    with pytest.raises(ValueError, match="task 0"):
        machine.run_parallel([lambda k=k: fail(k) for k in range(3)])
    assert sorted(ran) == [0, 1, 2]
