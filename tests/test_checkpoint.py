import pytest
import torch
from safetensors.torch import save_file

import echo
from conftest import random_model


def test_safetensors_round_trip(tmp_path):
    model = random_model("tiny", final_norm_eps=1e-5)
    path = echo.save(model, tmp_path / "model.safetensors")
    assert (tmp_path / "model.json").is_file()
    loaded = echo.load(path)
    assert not loaded.training and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(16000)
    assert torch.equal(loaded.encode(x, 16000)[0], model.encode(x, 16000)[0])


@pytest.mark.parametrize("wrapped", [True, False])
def test_pth_and_released_flat_safetensors(tmp_path, wrapped):
    model = random_model("small")
    state = model.state_dict()
    pth = tmp_path / "model.pth"
    torch.save({"encoder": state, "model_type": "small"} if wrapped else state, pth)
    flat = tmp_path / "released.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(flat))  # no echo metadata, like the release
    for path in (pth, flat):
        loaded = echo.load(path)
        assert loaded.config.heads == 6 and loaded.config.dim == 384
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_heads_override_and_size(tmp_path):
    path = echo.save(random_model("tiny"), tmp_path / "m.safetensors")
    (tmp_path / "m.json").unlink()
    assert echo.load(path, heads=6).config.heads == 6
    with pytest.raises(ValueError, match="does not match ECHO-small"):
        echo.load(path, size="small")
    with pytest.raises(ValueError, match="unknown ECHO size 'medium'"):
        echo.load(path, size="medium")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = random_model("tiny").state_dict()
    del state["encoder.layers.3.linear1.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["norm.weight"] = torch.zeros(191)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        echo.load(path)
    text = str(error.value)
    assert "missing keys: encoder.layers.3.linear1.bias" in text
    assert "unexpected keys: extra.weight" in text
    assert "norm.weight (191,) (expected (192,))" in text


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"encoder": random_model("tiny").state_dict(), "x": Payload()}, path)
    with pytest.raises(ValueError, match="refused"):
        echo.load(path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        echo.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        echo.load(tmp_path / "junk.safetensors")
