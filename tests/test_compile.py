"""The model and the packed encoder under torch.compile (users compile them for training and serving): same
results and gradients as eager, on a ragged batch of unsorted lengths (attention groups gathered by row index)."""
import pytest
import torch

from echo import packed

from conftest import random_model, rel_err


@pytest.mark.slow
@pytest.mark.parametrize("heads", [1, 2])  # head dim 64, where the compiled attention (no backward) may run, or 32
def test_model_and_packed_encoder_compile(heads):
    torch._dynamo.reset()
    model = random_model("tiny", dim=64, depth=2, heads=heads).eval()
    bands = torch.randn(3, 32, 16 * int(torch.randint(2, 9, ())))
    positions = torch.rand(3)
    lengths = torch.randint(2, 40, (int(torch.randint(5, 12, ())),))
    tokens = torch.randn(int(lengths.sum()), 64)
    packing = packed.Packing.from_lengths(lengths)  # unsorted lengths: gathered groups
    with torch.no_grad():
        sequences = model.band_tokens(bands, positions)
        assert rel_err(torch.compile(model)(sequences), model(sequences)) < 1e-5
        assert rel_err(torch.compile(packed.forward)(model, tokens, packing), packed.forward(model, tokens, packing)) < 1e-5
    # and a training step's gradients, of the tokens and of every parameter the tokens reach
    tokens.requires_grad_(True)
    trained = [tokens, *(p for name, p in model.named_parameters() if name.startswith(("encoder.", "norm.")))]
    compiled = torch.autograd.grad(torch.compile(packed.forward)(model, tokens, packing).square().mean(), trained)
    eager = torch.autograd.grad(packed.forward(model, tokens, packing).square().mean(), trained)
    assert all(rel_err(got, expected) < 1e-5 for got, expected in zip(compiled, eager))
