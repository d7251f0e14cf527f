"""The machine mixprec runs on: CPU features, and the worker threads of mixprec's CPU kernels.

One home for what several layers ask of the host: which vector units the CPU has (to choose
native or emulated execution, and to label benchmark figures, which compare only within one
machine), and one shared thread pool for kernels that split a tensor into ranges.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

__all__ = ["cpu_capability", "cpu_flags", "cpu_vendor", "run_parallel", "summary"]

# flags that decide mixprec's speed: vector width, bf16/fp16 dot products, matrix units
_SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_worker = threading.local()  # .active is True inside a pool thread's task


def _cpuinfo_field(name: str) -> str | None:
    """The first value of field ``name`` in ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none). Read once."""
    return frozenset((_cpuinfo_field("flags") or "").split())


@lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU vendor (``GenuineIntel``, ``AuthenticAMD``, ...; ``platform.processor()`` where
    ``/proc/cpuinfo`` has none). Floating-point results of the same program can differ between
    vendors at the same torch capability: MKL runs other GEMM kernels (another summation order)
    on AMD CPUs than on Intel ones."""
    return _cpuinfo_field("vendor_id") or platform.processor() or "unknown"


def cpu_capability() -> str:
    """The vector ISA torch's own CPU kernels use (``torch.backends.cpu.get_cpu_capability()``)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def summary() -> str:
    """One line for benchmark tables: CPU, capability torch uses, threads, and speed flags."""
    import torch

    flags = " ".join(f for f in _SPEED_FLAGS if f in cpu_flags())
    return (
        f"{platform.machine()} {cpu_vendor()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"capability {cpu_capability()}, threads {torch.get_num_threads()}, "
        f"flags: {flags or 'n/a'}"
    )


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or workers > _pool_size:
            # grows only; the old pool's idle threads exit when it is garbage-collected
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mixprec")
            _pool_size = workers
        return _pool


def _as_worker(task: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        _worker.active = True
        try:
            task()
        finally:
            _worker.active = False

    return run


def run_parallel(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on the shared pool, one thread each, and wait for all of them.

    Called from inside a pool task (a kernel that calls another kernel), or with one task, the
    tasks run inline in order instead: a pool thread that waited on the same pool could wait
    forever. After all tasks have finished, the exception of the first task (in task order) that
    raised propagates.
    """
    if len(tasks) <= 1 or getattr(_worker, "active", False):
        for task in tasks:
            task()
        return
    pool = _shared_pool(len(tasks))
    futures = [pool.submit(_as_worker(task)) for task in tasks]
    wait(futures)
    for f in futures:
        f.result()
