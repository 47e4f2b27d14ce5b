"""The padded baseline of bench/pretrain_throughput.py computes the packed step's loss and gradients, so
its timings compare the same work; and it really pads (the batch has sequences of several lengths)."""
import os
import sys

import pytest
import torch

from conftest import random_model, rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import pretrain_throughput as bench  # noqa: E402

from echo.model import EchoConfig  # noqa: E402
from echo.pretrain.objective import ConvDecoder  # noqa: E402
from echo.pretrain.sampling import SamplingConfig  # noqa: E402


def test_padded_step_has_the_packed_loss_and_gradients():
    config = SamplingConfig(tokens_per_batch=500, clones=2)
    # 1-3 s clips: several fit the budget, with different lengths (one 10 s clip could fill it alone, unpadded)
    batch = bench.make_batches(1, config, seed=int(torch.randint(0, 10_000, ())), seconds=(1.0, 3.0))[0]
    assert bench.padded_tokens(batch) > bench.real_tokens(batch)  # unequal lengths: padding happens
    trainer = bench.make_trainer(EchoConfig.preset("tiny", dim=64, depth=2, heads=2), torch.device("cpu"), bf16=False)
    trainer.learner.student = random_model("tiny", dim=64, depth=2, heads=2)  # every parameter random
    trainer.learner.decoder = ConvDecoder(64, layers=2)
    trainer.teacher = random_model("tiny", dim=64, depth=2, heads=2)
    packed_parts, packed_grads = loss_and_gradients(trainer, batch, padded=False)
    padded_parts, padded_grads = loss_and_gradients(trainer, batch, padded=True)
    for got, expected in zip(padded_parts, packed_parts):
        assert rel_err(got, expected) < 1e-5
    for got, expected in zip(padded_grads, packed_grads):
        assert rel_err(got, expected) < 1e-5


def loss_and_gradients(trainer, batch, padded):
    trainer.learner.zero_grad(set_to_none=True)
    parts = bench.losses(trainer, batch, padded)
    parts[0].backward()
    return [p.detach() for p in parts], [p.grad.clone() for p in trainer.learner.parameters() if p.requires_grad]


@pytest.mark.parametrize("option, named", [(["--steps", "0"], "--steps"), (["--repeats", "0"], "--repeats"),
                                           (["--warmup", "-1"], "--warmup"),
                                           (["--tokens-per-batch", "100"], "tokens_per_batch 100")])
def test_options_that_leave_nothing_to_time_are_refused_at_once(monkeypatch, capsys, option, named):
    """They ran on through the batches and the loss check to a KeyError or ZeroDivisionError (or a ValueError
    traceback from the sampling config): now an argument error, before any batch is made."""
    monkeypatch.setattr(sys, "argv", ["pretrain_throughput.py", "--sizes", "tiny", *option])
    monkeypatch.setattr(bench, "make_batches", lambda *args, **kwargs: pytest.fail("batches made"))
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == 2
    assert named in capsys.readouterr().err
