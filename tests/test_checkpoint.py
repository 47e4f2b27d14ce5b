import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import echo
from echo import checkpoint
from echo.model import EchoModel
from conftest import random_model, same_weights


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


def test_a_flat_file_of_another_mlp_ratio_loads_with_its_ratio(tmp_path):
    """Without metadata the ratio came from EchoConfig's default (4): a ratio-2 file was "mis-shaped"."""
    model = random_model(dim=128, depth=2, heads=2, mlp_ratio=2)
    flat = tmp_path / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(flat))
    loaded = echo.load(flat, heads=2)
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_heads_override_and_size(tmp_path):
    path = echo.save(random_model("tiny"), tmp_path / "m.safetensors")
    (tmp_path / "m.json").unlink()
    assert echo.load(path, heads=6).config.heads == 6
    # a numpy size names the preset as an int does (it took the 6-head default: a silently other model)
    pth = tmp_path / "m.pth"
    torch.save(random_model("tiny").state_dict(), pth)
    assert echo.load(pth, depth=np.int64(12)).config.heads == echo.load(pth).config.heads == 3
    with pytest.raises(ValueError, match="does not match ECHO-small"):
        echo.load(path, size="small")
    with pytest.raises(ValueError, match="unknown ECHO size 'medium'"):
        echo.load(path, size="medium")
    with pytest.raises(ValueError, match=r"unknown ECHO size \['tiny'\]"):
        echo.load(path, size=["tiny"])
    for wrong in (None, 3, path.read_bytes()[:10], [path]):
        with pytest.raises(ValueError, match=f"echo.load takes a checkpoint path or name, got {type(wrong).__name__}"):
            echo.load(wrong)


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


def test_pickle_with_objects_is_refused_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"encoder": random_model("tiny").state_dict(), "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"refused: .* \((builtins\.)?print\)") as error:
        echo.load(path)
    assert "this must never run" not in capsys.readouterr().out
    assert "weights_only" not in str(error.value)


def test_a_whole_pickled_model_is_refused_with_what_to_save_instead(tmp_path):
    """Refused as objects echo never unpickles, with no word of the state dict that echo does read."""
    path = tmp_path / "m.pt"
    torch.save(random_model("tiny", depth=1), path)
    with pytest.raises(ValueError, match=r"m.pt: refused: .*\(echo.model.EchoModel\), .*: save its state_dict\(\) "
                                         r"instead, torch.save\(model.state_dict\(\), 'model.pth'\), and load that$"):
        echo.load(path)


def test_missing_and_corrupt_files(tmp_path):
    for caught in (ValueError, FileNotFoundError):  # a caller's `except FileNotFoundError` missed it
        with pytest.raises(caught, match="does not exist"):
            echo.load(tmp_path / "nope.safetensors")
    path = echo.save(random_model("tiny"), tmp_path / "model.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors"):
        echo.load(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="cut.pth: not a readable torch checkpoint"):
        echo.load(tmp_path / "cut.pth")
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    assert same_weights(echo.load(folder), echo.load(path))  # a run folder: its one model file
    (folder / "model.safetensors").rename(folder / "teacher.safetensors")
    (folder / "student.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="run is a directory, not a checkpoint file; it holds student.pth, "
                                         "teacher.safetensors: load one of those by path"):
        echo.load(folder)
    (folder / "student.pth").rename(folder / "last.ckpt")  # Lightning's suffix: one candidate too, not passed over
    with pytest.raises(ValueError, match="it holds last.ckpt, teacher.safetensors: load one of those by path"):
        echo.load(folder)
    (folder / "teacher.safetensors").unlink(), (folder / "last.ckpt").unlink()
    (folder / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{folder} is a pretraining run with no model file yet: `python -m "
                                                   f"echo pretrain --out {folder} --export-only` writes")):
        echo.load(folder)


@pytest.mark.parametrize("content", [b"hello world\n", b"<!DOCTYPE html><html><body>404</body></html>",
                                     bytes(range(1, 100)), b"", b"\x80\x02garbage that is no pickle"])
def test_files_that_are_not_checkpoints_are_named_so(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.pth: (neither a safetensors file nor a torch checkpoint|not a readable "
                                         "torch checkpoint)") as error:
        echo.load(path)
    assert "weights_only" not in str(error.value) and "objects other than tensors" not in str(error.value)


def test_git_lfs_pointer_is_recognised(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    with pytest.raises(ValueError, match="model.safetensors: a git-lfs pointer, not the weights"):
        echo.load(path)


def test_format_is_read_from_content_not_suffix(tmp_path):
    model = random_model("tiny")
    safetensors_named_bin = tmp_path / "model.bin"
    safetensors_named_bin.write_bytes(echo.save(model, tmp_path / "model.safetensors").read_bytes())
    torch_named_safetensors = tmp_path / "torch.safetensors"
    torch.save(model.state_dict(), torch_named_safetensors)
    for path in (safetensors_named_bin, torch_named_safetensors):
        loaded = echo.load(path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items()), path


def test_save_refuses_non_floating_dtypes(tmp_path):
    with pytest.raises(ValueError, match="floating-point dtype, got torch.int32"):
        echo.save(random_model("tiny"), tmp_path / "m.safetensors", dtype=torch.int32)
    for spelled in ("float16", np.float16):  # an AttributeError: 'str' object has no attribute 'is_floating_point'
        with pytest.raises(ValueError, match=r"save's dtype is a torch dtype such as torch.float16, got .*float16"):
            echo.save(random_model("tiny"), tmp_path / "m.safetensors", dtype=spelled)
    assert not (tmp_path / "m.safetensors").exists()


def test_save_takes_the_model_not_a_wrapper_or_its_state(tmp_path):
    """A torch.compile'd model was saved with every key under '_orig_mod.': a file echo.load then refused."""
    model = random_model("tiny")
    path = tmp_path / "m.safetensors"
    for wrapper, attribute in ((torch.compile(model), "_orig_mod"), (torch.nn.DataParallel(model), "module")):
        with pytest.raises(ValueError, match=rf"save takes an EchoModel, got {type(wrapper).__name__}; pass the model "
                                             rf"it wraps, its .{attribute}$"):
            echo.save(wrapper, path)
    for wrong, problem in ((model.state_dict(), "OrderedDict$"), (path, "PosixPath$")):  # (path, model): swapped
        with pytest.raises(ValueError, match=f"save takes an EchoModel, got {problem}"):
            echo.save(wrong, model)
    assert list(tmp_path.iterdir()) == []


def test_save_expands_home_as_load_does(tmp_path, monkeypatch):
    """save wrote "~/models/m.safetensors" under a folder named '~' in the working folder, where
    echo.load("~/models/m.safetensors") did not look."""
    model = random_model("tiny")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert echo.save(model, "~/models/m.safetensors") == tmp_path / "home" / "models" / "m.safetensors"
    assert not (tmp_path / "~").exists()
    assert torch.equal(echo.load("~/models/m.safetensors").norm.weight, model.norm.weight)


@pytest.mark.parametrize("content, problem", [
    (lambda state: {"state_dict": state, "epoch": 3}, r"these entries are not tensors: 'state_dict' \(OrderedDict\), "
                                                     r"'epoch' \(int\); the weights look to be under 'state_dict': "
                                                     r"save that alone and load it, e.g. torch.save\(torch.load\("
                                                     r"'.*m.pth', weights_only=True\)\['state_dict'\], 'model.pth'\)$"),
    (lambda state: {"model": state, "ema": {"module." + key: value for key, value in state.items()}},
     r"these entries are not tensors: 'model' \(OrderedDict\), 'ema' \(dict\); the weights look to be under "
     r"'model', 'ema': save one alone and load it, e.g. .*\['model'\]"),
    (lambda state: {**state, "step": 7}, r"these entries are not tensors: 'step' \(int\)$"),
    (lambda state: [state], "it holds a list$"),
])
def test_a_trainers_checkpoint_names_what_it_holds(tmp_path, content, problem):
    """Refused as "expected a flat dict of tensors" alone: which key held the weights was left to guess; then
    named, with no word of how to load them."""
    path = tmp_path / "m.pth"
    torch.save(content(random_model("tiny").state_dict()), path)
    with pytest.raises(ValueError, match=rf"m.pth: expected a flat dict of tensors, or one under the key 'encoder'; "
                                         rf"{problem}"):
        echo.load(path)


@pytest.mark.parametrize("prefix, size", [("module.", None), ("_orig_mod.", None), ("module.", "tiny")])
def test_a_wrappers_state_dict_is_named_as_such(tmp_path, prefix, size):
    """Keys under DistributedDataParallel's or torch.compile's prefix were reported as "no 'cls_token'", or with
    size= as every layer missing."""
    path = tmp_path / "m.pth"
    torch.save({prefix + key: value for key, value in random_model("tiny").state_dict().items()}, path)
    with pytest.raises(ValueError, match=rf"m.pth: its keys are under the prefix '{prefix}' \({prefix}cls_token, not "
                                         rf"cls_token\), as a wrapper's state dict"):
        echo.load(path, size=size)


@pytest.mark.parametrize("prefix, holder", [
    ("_orig_mod.module.", "a wrapper's state dict"),  # torch.compile of a DistributedDataParallel
    ("student.", "a model holding the encoder as one of its parts"),
    ("encoder.", "a model holding the encoder as one of its parts"),
])
def test_prefixed_keys_are_said_with_what_holds_them_and_how_to_take_them_out(tmp_path, prefix, holder):
    """A classifier's or a student/teacher pair's keys were said to be a wrapper's (torch.compile's,
    DistributedDataParallel's), to be fixed by saving "the model it wraps"; and what to do with the keys was left
    to the user to work out."""
    state = random_model("tiny", depth=1).state_dict()
    path = tmp_path / "m.pth"
    torch.save({prefix + key: value for key, value in state.items()}, path)
    with pytest.raises(ValueError, match=rf"under the prefix '{prefix}' .*, as {holder}") as error:
        echo.load(path)
    take_out = str(error.value).split("without the prefix: ")[1]
    state_dict = torch.load(path, weights_only=True)
    assert eval(take_out, {"state_dict": state_dict}).keys() == state.keys()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_floating_weights_are_refused_by_key_and_dtype(tmp_path, dtype):
    state = random_model("tiny").state_dict()
    state["norm.weight"] = state["norm.weight"].to(dtype)
    path = tmp_path / "m.safetensors"
    try:
        save_file(state, str(path))
    except KeyError:  # safetensors < 0.7 (pyproject allows older) writes no complex tensors
        pytest.skip(f"this safetensors cannot write {dtype}")
    with pytest.raises(ValueError, match=rf"must be floating point; these are not: norm.weight \({dtype}\)$"):
        echo.load(path)


@pytest.mark.parametrize("metadata, problem", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"dim": 192, "depth": 12, "heads": 3, "qk_norm": True}), "fields this echo does not know: qk_norm"),
    ("[1, 2]", "must be a JSON object, not list"),
])
def test_bad_config_metadata_names_file_and_problem(tmp_path, metadata, problem):
    path = tmp_path / "m.safetensors"
    save_file(random_model("tiny").state_dict(), str(path), metadata={"echo_config": metadata})
    with pytest.raises(ValueError, match=f"m.safetensors: its echo_config metadata .*{problem}"):
        echo.load(path)


@pytest.mark.parametrize("fields, problem", [
    ({"dim": "192"}, "dim='192'"),
    ({"dim": 192.0}, "dim=192.0"),  # failed in torch.zeros
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps=nan"),  # loaded a model of NaN outputs
    ({"heads": 0}, "heads=0"),
    ({"heads": 5}, "dim=192 must be even and divisible by heads=5"),  # split_heads would cut the width unevenly
    ({"dim": 195, "heads": 5}, "dim=195 must be even"),  # the positional encodings pair sines and cosines
])
def test_config_values_are_checked_whatever_the_config_came_from(tmp_path, fields, problem):
    path = tmp_path / "m.safetensors"
    config = {"dim": 192, "depth": 12, "heads": 3, **fields}
    save_file(random_model("tiny").state_dict(), str(path), metadata={"echo_config": json.dumps(config)})
    with pytest.raises(ValueError, match=f"m.safetensors: invalid ECHO config: {problem}"):
        echo.load(path)
    with pytest.raises(ValueError, match=f"invalid ECHO config: {problem}"):
        echo.EchoConfig(**config)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_overrides_behave_alike_with_and_without_metadata(tmp_path, with_metadata):
    model = random_model("tiny")
    path = tmp_path / "m.safetensors"
    if with_metadata:
        echo.save(model, path)
    else:
        save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match="unknown config field.* bogus; valid: .*heads, mlp_ratio"):
        echo.load(path, bogus=1)
    assert echo.load(path, dim=192).config == model.config
    shapes_checked = r"m.safetensors: does not match .*cls_token \(1, 1, 192\) \(expected \(1, 1, 384\)"
    with pytest.raises(ValueError, match=shapes_checked):
        echo.load(path, dim=384)
    with pytest.raises(ValueError, match="m.safetensors: invalid ECHO config: .*heads=0"):
        echo.load(path, heads=0)


def test_zero_dim_cls_token_and_non_string_keys_are_named(tmp_path):
    state = random_model("tiny").state_dict()
    path = tmp_path / "m.safetensors"
    save_file({**state, "cls_token": torch.tensor(0.0)}, str(path))
    with pytest.raises(ValueError, match=r"m.safetensors: mis-shaped key cls_token \(\)"):
        echo.load(path)
    path = tmp_path / "m.pth"
    torch.save({**state, 0: torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="m.pth: state dict keys must be strings, found 0"):
        echo.load(path)


@pytest.mark.parametrize("dtype, value", [(torch.float32, float("nan")), (torch.float16, float("inf")),
                                          (torch.float64, 1e300)])  # 1e300 is Inf in float32
def test_non_finite_weights_are_refused_by_key(tmp_path, dtype, value):
    state = {key: tensor.to(dtype) for key, tensor in random_model("tiny").state_dict().items()}
    state["encoder.layers.2.linear2.weight"][5, 7] = value
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"m.safetensors: weights must be finite; these hold NaN or Inf .*: "
                                         r"encoder.layers.2.linear2.weight \(1 of 147456 values\)$"):
        echo.load(path)


def test_metadata_without_heads_takes_them_from_the_shapes_not_the_small_default(tmp_path):
    model = random_model("tiny")
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path), metadata={"echo_config": json.dumps({"dim": 192, "depth": 12})})
    loaded = echo.load(path)
    assert loaded.config.heads == 3
    x = torch.randn(16000)
    assert torch.equal(loaded.encode(x, 16000)[0], model.encode(x, 16000)[0])


def test_size_keeps_the_files_other_fields(tmp_path):
    path = echo.save(random_model("tiny", final_norm_eps=1e-5), tmp_path / "m.safetensors")
    assert echo.load(path, size="tiny").config.final_norm_eps == 1e-5
    assert echo.load(path, size="tiny", final_norm_eps=1e-6).config.final_norm_eps == 1e-6


@pytest.mark.parametrize("extra, metadata, problem", [
    ({"encoder.layers.100000.linear1.bias": torch.zeros(3)}, None,
     r"depth 100001\); missing layers: 12, 13, .* \(99988 in all\) \(it holds 13 layers, numbered up to 100000\)"),
    ({}, {"dim": 192, "depth": 100000, "heads": 3}, r"depth 100000\); missing layers: 12, 13, .*\(99988 in all\)"),
    ({}, {"dim": 65536, "depth": 12, "heads": 1024},
     r"mis-shaped keys: cls_token \(1, 1, 192\) \(expected \(1, 1, 65536"),
])
def test_a_file_that_does_not_fit_its_config_is_refused_before_a_model_is_built(tmp_path, monkeypatch, extra,
                                                                                metadata, problem):
    """A stray key or a bad metadata size once built a model of 100001 layers (or dim 65536): tens of GB."""
    def checked_first(config):
        assert torch.empty(0).device.type == "meta", f"a model of {config} was built before the file was checked"
        return EchoModel(config)

    monkeypatch.setattr(checkpoint, "EchoModel", checked_first)
    path = tmp_path / "m.safetensors"
    save_file({**random_model("tiny").state_dict(), **extra}, str(path),
              metadata=metadata and {"echo_config": json.dumps(metadata)})
    with pytest.raises(ValueError, match=f"m.safetensors: does not match ECHO-custom .*{problem}"):
        echo.load(path)


def test_home_relative_paths_empty_paths_and_broken_links(tmp_path, monkeypatch):
    model = random_model("tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    echo.save(model, tmp_path / "models" / "m.safetensors")
    assert torch.equal(echo.load("~/models/m.safetensors").norm.weight, model.norm.weight)
    with pytest.raises(ValueError, match="no checkpoint given .*; give a checkpoint file or a name: default, echo-"):
        echo.load("")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(ValueError, match="link.safetensors is a symbolic link to .*gone.safetensors, which does not"):
        echo.load(tmp_path / "link.safetensors")


def test_save_onto_a_folder_names_the_folder(tmp_path):
    """A raw IsADirectoryError named the temporary file beside the folder."""
    (tmp_path / "m.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"save writes a file, and .*m\.safetensors is a folder"):
        echo.save(random_model("tiny"), tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_where_its_config_or_its_folder_cannot_be_names_what_is_in_the_way(tmp_path):
    """A folder named as the config beside it: the weights were written, then IsADirectoryError, half a pair. A file
    where a folder of the path should be: FileExistsError "[Errno 17] File exists", which said neither."""
    model = random_model("tiny")
    (tmp_path / "m.json").mkdir()
    with pytest.raises(ValueError, match=r"save writes .*m\.safetensors and its config m\.json beside it, and "
                                         r".*m\.json is a folder"):
        echo.save(model, tmp_path / "m.safetensors")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"afile/m\.safetensors cannot be written: .*afile is a file, not a folder"):
        echo.save(model, tmp_path / "afile" / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m.json"]


def test_a_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, which no command line catches: the export at
    the end of a pretraining run came out as a traceback."""
    from safetensors import SafetensorError

    from echo import checkpoint

    full = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'

    def disk_full(state, path, metadata):
        open(path, "wb").write(b"half")
        raise SafetensorError(full)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match=r"m\.safetensors could not be written: Error while serializing"):
        echo.save(random_model("tiny"), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_sparse_weights_are_named(tmp_path):
    """A .pth holding a sparse tensor failed inside torch (NotImplementedError for SparseCPU)."""
    state = random_model("tiny").state_dict()
    state["norm.weight"] = state["norm.weight"].to_sparse()
    torch.save(state, tmp_path / "sparse.pth")
    with pytest.raises(ValueError, match=r"weights must be dense tensors; these are not: norm\.weight "
                                         r"\(torch\.sparse_coo\)"):
        echo.load(tmp_path / "sparse.pth")


def test_a_lone_tilde_is_the_home_folder_not_a_checkpoint_name(tmp_path, monkeypatch):
    """echo.load("~") answered "unknown checkpoint name '~'"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {home} does not exist") + "$"):
        echo.load("~")
    model = random_model("tiny")
    echo.save(model, home / "model.safetensors")
    assert same_weights(echo.load("~"), model)  # the folder's one model file
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {home / 'models' / 'm.safetensors'} does not exist")):
        echo.load("~/models/m.safetensors")
    with pytest.raises(ValueError, match=r"unknown checkpoint name 'Echo-Tiny' \(did you mean 'echo-tiny'\?\)"):
        echo.load("Echo-Tiny")


def test_a_name_or_path_too_long_for_the_file_system_is_unknown_or_missing(tmp_path):
    """pathlib's checks raised OSError "[Errno 36] File name too long" for them."""
    name = "x" * int(torch.randint(300, 5000, ()))
    with pytest.raises(ValueError, match="unknown checkpoint name 'xxxx.*; known names: default"):
        echo.load(name)
    path = tmp_path / (name + ".safetensors")
    for given in (path, str(path)):
        with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {path} does not exist")):
            echo.load(given)


def test_a_torchscript_archive_is_refused_without_torchs_warning_or_advice(tmp_path):
    """torch.load warned that it was "dispatching to 'torch.jit.load'", then refused with its advice to re-run
    with weights_only=False, which would run the archive's code."""
    import warnings

    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own, in torch 2.10 and later
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"m\.pt: a TorchScript archive \(torch\.jit\.save\)") as error:
            echo.load(path)
    assert "weights_only" not in str(error.value)
    assert [str(warning.message) for warning in caught] == []


@pytest.mark.parametrize("value, dtype", [
    (float("nan"), torch.float32),
    (1e5, torch.float16),  # finite in the model, beyond float16's 65504
    (float("-inf"), torch.bfloat16),
    (float("nan"), torch.float8_e4m3fn),  # torch has no isfinite for it
])
def test_save_refuses_weights_that_load_would_refuse(tmp_path, value, dtype):
    """A NaN weight, or one beyond the range of save's dtype (float16 for a release), was written without a word:
    echo.load then refused the file, after the model it came from was gone."""
    model = random_model("tiny", depth=2)
    with torch.no_grad():
        model.norm.weight[3] = value
    with pytest.raises(ValueError, match=rf"m\.safetensors: not written: these weights hold NaN or Inf in "
                                         rf"{re.escape(str(dtype))} .*, which echo\.load refuses: norm\.weight "
                                         rf"\(1 of 192 values\)$"):
        echo.save(model, tmp_path / "m.safetensors", dtype=dtype)
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        model.norm.weight[3] = 1.0
    assert echo.load(echo.save(model, tmp_path / "m.safetensors", dtype=dtype)).norm.weight[3] == 1.0


@pytest.fixture
def torch_defaults():
    """Lets a test set torch's default device and dtype; both are restored after it, whatever happens."""
    device, dtype = torch.get_default_device(), torch.get_default_dtype()
    yield
    torch.set_default_device(None if device == torch.device("cpu") else device)
    torch.set_default_dtype(dtype)


CUDA = ["cuda"] if torch.cuda.is_available() else []


@pytest.mark.parametrize("default_device, default_dtype", [
    ("meta", torch.float32), ("cpu", torch.float64), ("meta", torch.float64), *((d, torch.float32) for d in CUDA)])
@pytest.mark.parametrize("device", [None, "cpu", *CUDA])
def test_load_is_float32_on_its_device_whatever_torchs_defaults(tmp_path, torch_defaults, default_device,
                                                                 default_dtype, device):
    """The model was built on torch's default device and in its default dtype: under set_default_device("meta")
    load returned a model without weights (or failed moving it to `device`), on "cuda" a device=None model was
    on the GPU, and under set_default_dtype(torch.float64) it was float64."""
    model = random_model("tiny", depth=2)
    path = echo.save(model, tmp_path / "m.safetensors")
    torch.set_default_device(default_device)
    torch.set_default_dtype(default_dtype)
    loaded = echo.load(path, device=device)
    assert not loaded.training and not loaded.pos_embed.requires_grad
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert state[key].device == torch.device(device or "cpu") and state[key].dtype == torch.float32, key
        assert torch.equal(state[key].cpu(), value), key


def test_a_flat_file_of_a_custom_size_gets_64_dim_heads(tmp_path):
    """Without metadata or heads=, a size that is no preset takes head dim 64 (infer_config): dim 256 has 4
    heads, and the loaded model encodes as the one saved (heads change the outputs)."""
    model = random_model(dim=256, depth=2, heads=4)
    flat = tmp_path / "custom.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(flat))
    loaded = echo.load(flat)
    assert loaded.config.heads == 256 // 64 == 4 and loaded.config == model.config
    x = torch.randn(int(torch.randint(4000, 9000, ())))
    assert torch.equal(loaded.encode(x, 16000)[0], model.encode(x, 16000)[0])


def test_loading_a_checkpoint_does_not_import_torch_dynamo_or_sympy(tmp_path):
    """load shapes the model on the meta device, where nn.init.normal_ goes through torch._refs, which imports
    torch._dynamo: ~1-3 s added to every command's start, for a tensor whose values are never used; and
    allocating that model (to_empty) imported torch's symbolic shapes and sympy, ~1 s more."""
    import subprocess
    import sys

    path = echo.save(random_model("tiny", depth=1), tmp_path / "tiny.safetensors")
    loaded = subprocess.run([sys.executable, "-c", f"import sys, echo; echo.load({str(path)!r}); "
                             "print(*(name in sys.modules for name in ('torch._dynamo', 'sympy')))"],
                            capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.split() == ["False", "False"], loaded.stdout + loaded.stderr


def test_weights_sharing_a_tensor_in_a_torch_checkpoint_load_as_parameters_of_their_own(tmp_path):
    """The file's weights become the model's parameters (not copied into an allocated model): two keys saved as
    views of one tensor would have trained as one parameter, and a slice kept its whole tensor in memory."""
    model = random_model("tiny", depth=2)
    state = dict(model.state_dict())
    (first, second), sliced = (f"encoder.layers.{layer}.linear1.bias" for layer in (0, 1)), "cls_token"
    state[second] = state[first]  # one tensor under two keys
    state[sliced] = torch.cat([state[sliced].flatten(), torch.randn(1000)])[:state[sliced].numel()].view_as(
        state[sliced])
    torch.save(state, tmp_path / "views.pt")
    loaded = echo.load(tmp_path / "views.pt")
    with torch.no_grad():
        loaded.get_parameter(first).add_(1)
    assert torch.equal(loaded.get_parameter(first), model.get_parameter(first) + 1)
    assert torch.equal(loaded.get_parameter(second), model.get_parameter(first))
    assert torch.equal(loaded.cls_token, model.cls_token)
    for name, parameter in loaded.named_parameters():
        assert parameter.untyped_storage().nbytes() == parameter.nbytes and parameter.is_contiguous(), name


def test_a_checkpoint_in_torchs_legacy_format_loads(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) writes a bare pickle (its first byte the pickle
    protocol's 0x80), not a zip: the format check must still read it as a torch checkpoint."""
    model = random_model("tiny", depth=1)
    path = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    loaded = echo.load(path, depth=1)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_pretraining_checkpoint_with_its_training_state_is_named(tmp_path, monkeypatch):
    """echo's pretraining checkpoints hold a student, a teacher and the step among other entries (optimizer,
    decoder, rng...): recognised only when those three were all it held, it was refused as entries that are not
    tensors, with no word of how to export an encoder. Then its Python advice failed after `import echo`
    (echo.pretrain.trainer is not imported by it) and gave a tuple, not a model; its command asked for --data,
    which --export-only does not need; and its checkpoints/ folder was answered "load one of those by path"."""
    from echo.pretrain.trainer import PretrainConfig

    model = random_model("tiny", depth=1)
    state = model.state_dict()
    config = PretrainConfig(data="unused", out="unused", depth=1).to_dict()
    extra = {"optimizer": {"state": {}}, "decoder": dict(state), "world": 1, "config": config}
    step = int(torch.randint(1, 10**6, ()))
    run = tmp_path / "run"
    path = run / "checkpoints" / f"step-{step:09d}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"step": step, "student": state, "teacher": state, **extra}, path)
    (run / "checkpoints" / "step-000000000.pt").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=re.escape(f"checkpoints holds a pretraining run's checkpoints (step-000000000"
                                                   f".pt, step-{step:09d}.pt), which are no model files: `python -m "
                                                   f"echo pretrain --out {run} --export-only` writes")):
        echo.load(path.parent)
    loose = tmp_path / "step.pt"
    loose.write_bytes(path.read_bytes())
    for checkpoint_path, command in ((path, f"`python -m echo pretrain --out {run} --export-only --export teacher`"),
                                     (loose, None)):
        with pytest.raises(ValueError, match=rf"is a pretraining checkpoint \(step {step}: a student and a teacher"
                           ) as error:
            echo.load(checkpoint_path)
        assert (command in str(error.value)) if command else ("python -m" not in str(error.value))
        advice = str(error.value).split("in Python: ")[1]
        monkeypatch.chdir(tmp_path)
        exec(advice, {"echo": echo})  # as a user would run it after `import echo`
        assert same_weights(echo.load("model.safetensors"), model)


@pytest.mark.parametrize("key", [1.5, ("encoder", 0), b"cls_token"])
def test_keys_of_any_type_but_str_are_named(tmp_path, key):
    """Only integer keys were thought of: a tuple or bytes key went on to the key comparisons, where sorting
    str with other types fails as a TypeError naming no file."""
    path = tmp_path / "m.pth"
    torch.save({**random_model("tiny", depth=1).state_dict(), key: torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(f"m.pth: state dict keys must be strings, found {key!r}")):
        echo.load(path)


def test_a_stray_key_ending_in_cls_token_beside_cls_token_is_an_unexpected_key(tmp_path):
    """Only a state dict without cls_token is a wrapper's: one that holds cls_token and, say, a head's
    head.cls_token is the encoder with a key too many, and was said to be under the prefix 'head.'."""
    state = random_model("tiny", depth=1).state_dict()
    path = tmp_path / "m.pth"
    torch.save({**state, "head.cls_token": torch.randn(1, 1, 8)}, path)
    with pytest.raises(ValueError, match=r"unexpected keys: head\.cls_token") as error:
        echo.load(path)
    assert "prefix" not in str(error.value)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_weights_of_every_layout_are_named(tmp_path):
    """Not only COO: a compressed sparse row matrix (to_sparse_csr) is no dense weight either, and failed inside
    torch as COO did."""
    state = random_model("tiny", depth=1).state_dict()
    state["encoder.layers.0.linear1.weight"] = state["encoder.layers.0.linear1.weight"].to_sparse_csr()
    torch.save(state, tmp_path / "sparse.pth")
    with pytest.raises(ValueError, match=r"weights must be dense tensors; these are not: encoder\.layers\.0\.linear1"
                                         r"\.weight \(torch\.sparse_csr\)"):
        echo.load(tmp_path / "sparse.pth")


def test_layers_a_file_has_too_many_or_too_few_are_listed_exactly():
    """The layer check's edges: a file's layer `depth` (one past the config's last) is unexpected, not a count of
    -1 missing layers; and a short list of missing layers is given whole, without a ", ... (N in all)"."""
    from echo.model import EchoConfig

    held = int(torch.randint(2, 6, ()))
    state = random_model("tiny", depth=held).state_dict()
    fewer = held - 1
    with pytest.raises(ValueError, match=rf"\(dim 192, depth {fewer}\); unexpected layers: {fewer} \(it holds "
                                         rf"{held} layers, numbered up to {held - 1}\)$"):
        checkpoint._check_size(EchoConfig(dim=192, depth=fewer, heads=3), state, "m.pth")
    more = held + int(torch.randint(1, 8, ()))
    missing = ", ".join(map(str, range(held, more)))
    with pytest.raises(ValueError, match=rf"\(dim 192, depth {more}\); missing layers: {missing} \(it holds {held} "
                                         rf"layers, numbered up to {held - 1}\)$"):
        checkpoint._check_size(EchoConfig(dim=192, depth=more, heads=3), state, "m.pth")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_file_loads_as_float32(tmp_path, dtype):
    """A file saved in float16 or bfloat16 loads as a float32 model, as the docstring says: its weights kept in
    the file's dtype made a model that echo's float32 paths could not run on."""
    model = random_model("tiny", depth=1)
    path = echo.save(model, tmp_path / "half.safetensors", dtype=dtype)
    loaded = echo.load(path)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32, key
        assert torch.equal(loaded.state_dict()[key], value.to(dtype).float()), key


@pytest.mark.parametrize("name", ["model.pth", "model.bin", "model"])
def test_save_to_another_suffix_is_refused_and_writes_nothing(tmp_path, name):
    """save writes safetensors: a file named .pth (or without a suffix) would hold safetensors bytes under a
    torch checkpoint's name, with its config beside it as model.json."""
    with pytest.raises(ValueError, match=f"save writes .safetensors files, got {name}$"):
        echo.save(random_model("tiny", depth=1), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", [" ", "\t\n", "   "])
def test_a_blank_path_is_an_empty_path_not_a_name(path):
    """A path of spaces alone (an unset variable quoted in a shell script, padded) was looked up as a release
    name."""
    with pytest.raises(ValueError, match=r"^no checkpoint given \(an empty path\)"):
        echo.load(path)
