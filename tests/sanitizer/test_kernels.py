"""The sanitizer's float64 kernel for ``aten._grouped_mm`` (torch has none): its values against
torch's float32 op in every operand layout, and the op checked under the sanitizer (its calls
ran unshadowed before: unchecked, their results taken as exact)."""

from __future__ import annotations

import os

import pytest
import torch

from mixprec.sanitizer import sanitize
from mixprec.sanitizer.kernels import grouped_mm

OFFS = torch.tensor([8, 8, 24], dtype=torch.int32)  # three groups, the second one empty


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return [
        ("2d x 3d: the rows of a", r(24, 16), r(3, 16, 8), OFFS),
        ("3d x 2d: the columns of b", r(3, 8, 16), r(16, 24), OFFS),
        ("2d x 2d: the reduction", r(8, 24), r(24, 16), OFFS),
        ("3d x 3d: batched", r(3, 8, 16), r(3, 16, 8), None),
    ]


@pytest.mark.parametrize(("layout", "a", "b", "offs"), _cases(), ids=lambda c: str(c)[:9])
def test_grouped_mm_matches_torch(layout: str, a: torch.Tensor, b: torch.Tensor, offs) -> None:
    want = torch._grouped_mm(a, b, offs=offs)
    got = grouped_mm(a.double(), b.double(), offs)
    assert got.dtype == torch.float64 and got.shape == want.shape, layout
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_in_bf16_is_shadowed_and_checked() -> None:
    """The mixture-of-experts GEMM in bf16: shadowed (no ``ops_unshadowed``), and an expert
    whose products overflow bf16 is found there (nothing was before)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 16, generator=g).bfloat16()
    b = torch.randn(3, 16, 8, generator=g).bfloat16()
    with sanitize() as report:
        torch._grouped_mm(a * 1.0, b, offs=OFFS)
    assert report.findings == [] and report.stats["ops_unshadowed"] == {}
    a, b = a.clone(), b.clone()
    # the third expert's tokens and weights, positive: sums ~1e40, beyond bf16's 3.4e38
    a[8:] = a[8:].abs() * 1e20
    b[2] = b[2].abs() * 1e20
    with sanitize() as report:
        torch._grouped_mm(a * 1.0, b, offs=OFFS)
    assert [(f.kind, f.op) for f in report.findings] == [("overflow", "aten._grouped_mm.default")]


def test_mixtral_in_bf16_is_fully_shadowed() -> None:
    """HF Mixtral (small config, random init) converted to bf16 runs its experts through
    ``_grouped_mm``, forward and backward: every call shadowed, a clean step."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        intermediate_size=64, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).train().bfloat16()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with sanitize() as report:
        model(input_ids=ids, labels=ids).loss.backward()
    assert report.stats["ops_unshadowed"] == {}, report.stats["ops_unshadowed"]
    assert report.stats["internal_errors"] == {}
    assert report.findings == [], [f.label for f in report.findings]
