"""Shared fixtures for the mixprec test suite.

* ``backend``: runs a test once through the compiled C kernel and once through the pure-torch
  reference kernel. The switch is ``mixprec.quantization.quantize_backend``; the fixture
  restores the previous backend after each test, so nothing leaks between tests.
* ``set_backend``: ``quantize_backend`` for a test that switches backends itself, restored after
  it.
* ``same_bits``: bit-for-bit comparison of float tensors (NaN == NaN whatever its payload).
* session-scoped input sets (all fp16 / bf16 bit patterns, specials, fp32 subnormals, 2^22
  random fp32 bit patterns), built once because they are large.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

# the module, not the function: ``mixprec.quantize`` also names the public function (lazy export)
mq = importlib.import_module("mixprec.quantization.elementwise")

BACKENDS = ("c", "torch")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on a 2-core machine: one torch thread per worker, or the workers' thread
    # pools fight over the cores and every test runs slower
    torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny models run faster and ignore a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def set_backend() -> Iterator[Callable[[str], str]]:
    """``mixprec.quantization.quantize_backend``; the backend in use before the test comes back
    after it, also on failure."""
    before = mq.quantize_backend()
    yield mq.quantize_backend
    mq.quantize_backend(before)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, set_backend: Callable[[str], str]) -> str:
    """Select the quantize backend for one test: ``"c"`` (default dispatch) or ``"torch"``.

    Where the C kernel failed to build (no compiler at install) the default dispatch is the torch
    path too; then the ``"c"`` parameter re-runs the torch path rather than being skipped.
    """
    if request.param == "torch":
        set_backend("torch")
        assert not mq.has_c_kernel()
    else:
        set_backend("auto")
        assert mq.has_c_kernel() == (mq._kernels is not None)
    return request.param


def _int_view(t: torch.Tensor) -> torch.Tensor:
    itype = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }[t.dtype]
    return t.contiguous().view(itype)


def assert_same_bits(
    actual: torch.Tensor, expected: torch.Tensor, inputs: torch.Tensor | None = None, what: str = ""
) -> None:
    """Assert ``actual`` and ``expected`` are bit-identical (any NaN equals any NaN).

    On failure the message lists the first mismatches with their inputs, in hex, so a failing
    case can be reproduced directly.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    both_nan = torch.isnan(a) & torch.isnan(e)
    bad = (_int_view(a) != _int_view(e)) & ~both_nan
    n_bad = int(bad.sum())
    if n_bad:
        idx = torch.nonzero(bad).reshape(-1)[:8]
        lines = []
        for i in idx.tolist():
            x = "" if inputs is None else f"x={float(inputs.reshape(-1)[i]).hex()} "
            lines.append(f"  {x}got {float(a[i]).hex()} expected {float(e[i]).hex()}")
        raise AssertionError(
            f"{what}: {n_bad} of {a.numel()} elements differ, first ones:\n" + "\n".join(lines)
        )


@pytest.fixture(scope="session")
def same_bits() -> Callable[..., None]:
    """The :func:`assert_same_bits` helper, as a fixture (test modules do not import conftest)."""
    return assert_same_bits


def _from_bits32(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32).copy())


@pytest.fixture(scope="session")
def fp16_patterns() -> torch.Tensor:
    """All 2^16 float16 bit patterns, widened exactly to float32 (numpy's own conversion)."""
    return torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))


@pytest.fixture(scope="session")
def bf16_patterns() -> torch.Tensor:
    """All 2^16 bfloat16 bit patterns as float32 (a bf16 is the top half of an fp32)."""
    return _from_bits32(np.arange(1 << 16, dtype=np.uint32) << 16)


@pytest.fixture(scope="session")
def specials() -> torch.Tensor:
    """±0, ±inf, NaNs (quiet, signalling, negative, payloads), fp32 subnormals and extremes."""
    bits = [
        0x00000000, 0x80000000,  # ±0
        0x7F800000, 0xFF800000,  # ±inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x7FC12345,  # NaNs
        0x00000001, 0x00000002, 0x00000003, 0x00000100, 0x00200000, 0x00400000,
        0x00400001, 0x00600000, 0x007FFFFF, 0x003FFFFF,  # fp32 subnormals
        0x00800000, 0x00800001, 0x7F7FFFFF, 0x7F7FFFFE, 0x3F800000, 0x3F800001, 0x3F7FFFFF,
    ]  # fmt: skip
    rng = np.random.default_rng(1)
    sub = rng.integers(1, 1 << 23, size=4096, dtype=np.uint32)  # random fp32 subnormals
    pos = np.concatenate([np.array(bits, dtype=np.uint32), sub])
    return _from_bits32(np.concatenate([pos, pos | np.uint32(0x80000000)]))


@pytest.fixture(scope="session")
def random_fp32() -> torch.Tensor:
    """2^22 random fp32 bit patterns (seeded): every exponent, sign, NaN payload."""
    g = torch.Generator().manual_seed(20240613)
    return (
        torch.randint(-(1 << 31), 1 << 31, (1 << 22,), generator=g, dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
