"""The model and the packed encoder under torch.compile (users compile them for training and serving): same
results as eager, on a ragged batch of unsorted lengths (attention groups gathered by row index)."""
import pytest
import torch

from echo import packed

from conftest import random_model, rel_err


@pytest.mark.slow
def test_model_and_packed_encoder_compile():
    torch._dynamo.reset()
    model = random_model("tiny", dim=64, depth=2, heads=2).eval()
    bands = torch.randn(3, 32, 16 * int(torch.randint(2, 9, ())))
    positions = torch.rand(3)
    lengths = torch.randint(2, 40, (int(torch.randint(5, 12, ())),))
    tokens = torch.randn(int(lengths.sum()), 64)
    packing = packed.Packing.from_lengths(lengths)  # unsorted lengths: gathered groups
    with torch.no_grad():
        sequences = model.band_tokens(bands, positions)
        assert rel_err(torch.compile(model)(sequences), model(sequences)) < 1e-5
        assert rel_err(torch.compile(packed.forward)(model, tokens, packing), packed.forward(model, tokens, packing)) < 1e-5
    # and a training step's gradients
    compiled = torch.compile(packed.forward)
    tokens.requires_grad_(True)
    compiled(model, tokens, packing).square().mean().backward()
    compiled_grad = tokens.grad.clone()
    tokens.grad = None
    packed.forward(model, tokens, packing).square().mean().backward()
    assert rel_err(compiled_grad, tokens.grad) < 1e-5
