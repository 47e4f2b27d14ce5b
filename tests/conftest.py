import os

import numpy as np
import pytest
import torch

RATE_FAMILIES = [8000, 12000, 16000, 22050, 44100, 48000, 50000]


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed (ECHO_SEED=...)."""
    seed = int(os.environ.get("ECHO_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    print(f"ECHO_SEED={seed}")
    yield seed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return ((out - ref).norm() / ref.norm()).item()


def random_model(size: str = "tiny", **overrides):
    """A model with every parameter random (biases and norms included), so no term can hide."""
    from echo import EchoConfig, EchoModel

    model = EchoModel(EchoConfig.preset(size, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.02 if param.dim() > 1 else 0.1)
    return model
