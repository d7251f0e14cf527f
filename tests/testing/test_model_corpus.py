"""The real-model corpus: every model builds offline and takes one finite training step."""

from __future__ import annotations

import pytest
import torch

from mixprec.testing import corpus


@pytest.mark.parametrize("name", corpus.available())
def test_one_training_step(
    name: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    entry = corpus.get(name)
    model, args, kwargs = entry.example(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = entry.loss(model, args, kwargs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    # small configs that transformers accepts silently (no token id outside the vocabulary,
    # no unrecognised loss type): a user running the corpus sees only their own output
    assert "[transformers]" not in capfd.readouterr().err


def test_builds_are_reproducible() -> None:
    a, args, _ = corpus.get("nanogpt").example(seed=3)
    b, args2, _ = corpus.get("nanogpt").example(seed=3)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert torch.equal(args[0], args2[0])


@pytest.mark.parametrize("name", corpus.available())
def test_example_batch_repeated(name: str) -> None:
    entry = corpus.get(name)
    _, args, kwargs = entry.example(seed=1)
    _, args3, kwargs3 = entry.example(seed=1, repeat=3)
    for a, b in zip((*args, *kwargs.values()), (*args3, *kwargs3.values()), strict=True):
        assert b.shape[0] == 3 * a.shape[0] and torch.equal(b, torch.cat([a, a, a]))
    assert entry.batch(3).startswith(f"{3 * corpus.BATCH} x ")
    with pytest.raises(ValueError, match="repeat must be an int >= 1, got 0"):
        entry.example(repeat=0)


def test_nanogpt_checks_the_block_size_like_nanogpt() -> None:
    model = corpus.NanoGPT(corpus.NanoGPTConfig(block_size=8))
    with pytest.raises(AssertionError, match="block size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="gpt2, bert, llama, resnet18, vit, nanogpt"):
        corpus.get("resnet50")
