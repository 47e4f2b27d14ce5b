"""echo.load and echo.save given files and models that are not what they should be: each is refused with a
ValueError naming the file and the problem, never an error from inside torch or numpy."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import echo
from echo import checkpoint
from conftest import random_model


def test_a_metadata_dim_the_file_does_not_have_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    """Even on the meta device a model computes its pos_embed table (126 x dim) in numpy: a metadata dim of 2**40
    failed as a MemoryError (a smaller one took minutes and tens of GB) before the shapes were compared."""
    def never_built(config):
        raise AssertionError(f"a model of dim {config.dim} was built before the file was checked")

    monkeypatch.setattr(checkpoint, "EchoModel", never_built)
    path = tmp_path / "m.safetensors"
    save_file(random_model("tiny", depth=2).state_dict(), str(path),
              metadata={"echo_config": json.dumps({"dim": 2**40, "depth": 2, "heads": 1})})
    with pytest.raises(ValueError, match=r"m\.safetensors: does not match ECHO-custom \(dim 1099511627776, depth 2\); "
                                         r"mis-shaped keys: cls_token \(1, 1, 192\) \(expected \(1, 1, 1099511627776\)\)$"):
        echo.load(path)
    with pytest.raises(ValueError, match=r"mis-shaped keys: cls_token \(1, 1, 192\) \(expected \(1, 1, 1099511627776"):
        echo.load(path, size="tiny", dim=2**40, heads=1)


def test_meta_tensors_in_a_file_are_named(tmp_path):
    """A state dict saved from a model made on the meta device (before its weights were loaded) failed inside
    torch: "Tensor.item() cannot be called on meta tensors"."""
    state = random_model("tiny", depth=2).state_dict()
    path = tmp_path / "m.pth"
    torch.save({key: value.to("meta") for key, value in state.items()}, path)
    with pytest.raises(ValueError, match=r"m\.pth: holds no weights: these are meta tensors, .*: cls_token, pos_embed, "
                                         r".* \(30 in all\)$"):
        echo.load(path)


def test_save_of_a_model_on_the_meta_device_is_refused_and_writes_nothing(tmp_path):
    """It failed inside torch: "Cannot copy out of meta tensor; no data!"."""
    with torch.device("meta"):
        model = echo.EchoModel(echo.EchoConfig.preset("tiny", depth=2))
    with pytest.raises(ValueError, match=r"m\.safetensors: not written: the model's weights are on the meta device"):
        echo.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", [None, 3, b"m.safetensors"])
def test_save_names_a_path_that_is_not_one(tmp_path, path):
    """save(model, args.out) with no --out given: pathlib's TypeError, which names neither save nor its argument."""
    with pytest.raises(ValueError, match=f"save takes a .safetensors path, got {type(path).__name__}"):
        echo.save(random_model("tiny", depth=2), path)


def test_a_path_that_is_no_regular_file_is_not_said_to_be_missing(tmp_path):
    """echo.load("/dev/null") answered "checkpoint /dev/null does not exist"."""
    assert os.path.exists(os.devnull)
    with pytest.raises(ValueError, match=f"checkpoint {os.devnull} is not a regular file$"):
        echo.load(os.devnull)
    fifo = tmp_path / "weights.pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="weights.pipe is not a regular file$"):  # never opened: that would block
        echo.load(fifo)


@pytest.mark.parametrize("change, problem", [
    (lambda model: setattr(model.encoder, "layers", model.encoder.layers[:1]),
     r"missing keys: encoder\.layers\.1\.linear1\.bias, .* \(12 in all\)$"),
    (lambda model: setattr(model, "head", torch.nn.Linear(192, 10)), r"unexpected keys: head\.bias, head\.weight$"),
], ids=["layers-cut", "head-added"])
def test_save_refuses_a_model_whose_weights_do_not_fit_its_config(tmp_path, change, problem):
    """A model cut to fewer layers (or given a head) was written with its config's depth in the metadata: a file
    that echo.load then refused."""
    model = random_model("tiny", depth=2)
    change(model)
    with pytest.raises(ValueError, match=r"m\.safetensors: not written: the model's weights, which echo\.load would "
                                         rf"refuse: does not match ECHO-custom \(dim 192, depth 2\); {problem}"):
        echo.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
