"""Loading and saving ECHO weights: released `.safetensors` / `.pth` files and echo's own.

Only safetensors and `torch.load(weights_only=True)` are used, so no file can run code on load. The format is
read from the file's first bytes, not its suffix (a safetensors file named .bin loads). Loading is strict: a
missing, unexpected, mis-shaped, non-floating-point or non-finite key is an error that names the keys.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import atomic, hub
from .inputs import checked_device, first_items
from .model import PRESETS, EchoConfig, EchoModel
from .pretrain.checkpoints import NAME as PRETRAINING_CHECKPOINT

CONFIG_KEY = "echo_config"  # safetensors metadata entry holding the JSON config
CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(EchoConfig))
SIZE_FIELDS = ("dim", "depth", "heads")  # what a preset (size=) sets
LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")


class MissingCheckpoint(FileNotFoundError, ValueError):
    """A checkpoint path that names no file: caught as a missing file (`except FileNotFoundError`, as `open` and
    `torch.load` raise) or as bad input (`except ValueError`, as echo's other refusals)."""


# only to point at files inside a folder; .ckpt is PyTorch Lightning's: a folder of model.pt and last.ckpt loaded
# model.pt as if it were the folder's only checkpoint
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# where torch.compile and DataParallel / DistributedDataParallel keep the model they wrap; their state dicts hold
# its keys under this name and a dot
WRAPPER_ATTRIBUTES = ("_orig_mod", "module")


def _file_format(path: Path) -> str:
    """'safetensors' (an 8-byte little-endian header length, then a JSON object) or 'torch' (a zip archive, or a
    pickle for torch's legacy format), from the first bytes; anything else is refused here, before torch's
    unpickler can misreport text, HTML or random bytes as a pickle of foreign objects."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    if head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{path}: a git-lfs pointer, not the weights: fetch the file itself "
                         f"(git lfs pull, or download it from where the repository hosts it)")
    raise ValueError(f"{path}: neither a safetensors file nor a torch checkpoint "
                     f"({'empty' if not head else f'it starts with {head!r}'})")


def _unpickler_problem(path: Path, error: pickle.UnpicklingError) -> ValueError:
    """torch's weights-only refusal, without its advice to retry with weights_only=False: that would run
    whatever code the pickle holds, and for a damaged file it would not succeed anyway."""
    text = str(error)
    foreign = re.search(r"GLOBAL ([\w.]+)", text)
    if foreign:
        return ValueError(f"{path}: refused: the pickle holds objects other than tensors and plain containers "
                          f"({foreign.group(1)}), and echo never unpickles arbitrary objects; a whole pickled model "
                          f"(torch.save(model)) is no checkpoint echo reads: save its state_dict() instead, "
                          f"torch.save(model.state_dict(), 'model.pth'), and load that")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return ValueError(f"{path}: not a readable torch checkpoint" + (f" ({detail.group(1)})" if detail else ""))


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(state dict, saved config or {}); the config metadata is checked here, so a bad one (say, from a newer
    echo) is reported with the file's name instead of as a JSON or TypeError."""
    try:
        with torch.device("cpu"):  # safetensors < 0.6 made its tensors on torch's default device: meta gave no weights
            state = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if CONFIG_KEY not in metadata:
        return state, {}
    try:
        saved = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its {CONFIG_KEY} metadata is not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: its {CONFIG_KEY} metadata must be a JSON object, not {type(saved).__name__}")
    unknown = sorted(set(saved) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"{path}: its {CONFIG_KEY} metadata has fields this echo does not know: "
                         f"{', '.join(unknown)} (written by a newer echo?); known: {', '.join(CONFIG_FIELDS)}")
    return state, saved  # the values are checked by EchoConfig, in load


def _is_torchscript(path: Path) -> bool:
    """Whether a zip holds a TorchScript archive (torch's own test: a constants.pkl record): torch.load warns of
    it, then refuses it under weights_only with advice to retry without, which would run the archive's code."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except Exception:  # not a zip (a legacy pickle), or damaged in one of many ways: torch.load reports it
        return False


def _read_torch(path: Path) -> dict:
    """The flat state dict of a torch checkpoint, bare or under 'encoder' as the released .pth files hold it."""
    if _is_torchscript(path):
        raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), which holds code, and echo never runs a "
                         f"file's code; save the scripted model's state_dict() with torch.save and load that")
    try:
        with open(path, "rb") as handle:  # a handle, not the path: torch reads a path ending .safetensors as one
            obj = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickler_problem(path, error) from None
    except Exception as error:  # a damaged zip or pickle fails in many ways, none of them worth a torch traceback
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(obj, dict) and isinstance(obj.get("encoder"), dict):
        obj = obj["encoder"]
    if isinstance(obj, dict) and {"student", "teacher", "step"} <= obj.keys():  # echo's own training state
        raise _pretraining_checkpoint(path, obj["step"])
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a flat dict of tensors, or one under the key 'encoder'; it holds a "
                         f"{type(obj).__name__}")
    others = [f"{key!r} ({type(value).__name__})" for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others:  # named: a trainer's checkpoint keeps the weights under a key of its own ('state_dict', 'model')
        raise ValueError(f"{path}: expected a flat dict of tensors, or one under the key 'encoder'; these entries are "
                         f"not tensors: {first_items(others)}{_weights_inside(obj, path)}")
    not_strings = [repr(key) for key in obj if not isinstance(key, str)]
    if not_strings:
        raise ValueError(f"{path}: state dict keys must be strings, found {first_items(not_strings)}")
    return obj


def _pretraining_checkpoint(path: Path, step) -> ValueError:
    """How to make a model file of a pretraining checkpoint's encoder: in Python from this file wherever it lies,
    and, in its run's checkpoints/ folder, with the command that exports the run's newest checkpoint."""
    in_python = (f"in Python: from echo.pretrain import checkpoints, trainer; echo.save(trainer.checkpoint_encoder("
                 f"checkpoints.read({str(path)!r}), 'teacher'), 'model.safetensors')")
    if path.parent.name != "checkpoints":
        return ValueError(f"{path} is a pretraining checkpoint (step {step}: a student and a teacher, and the training "
                          f"state); write one of its encoders as a model file {in_python}")
    run = path.parent.parent
    return ValueError(f"{path} is a pretraining checkpoint (step {step}: a student and a teacher, and the training "
                      f"state); write one of its encoders as a model file with `python -m echo pretrain --out {run} "
                      f"--export-only --export teacher` (the newest checkpoint, to {run / 'model.safetensors'}), or "
                      f"this one's {in_python}")


def _weights_inside(checkpoint: dict, path: Path) -> str:
    """Which entries of a trainer's checkpoint hold an encoder's state dict (one with a cls_token, under a prefix or
    not), and how to save one alone: the entry's name alone left the user to work out the rest."""
    held = [key for key, value in checkpoint.items() if isinstance(value, dict)
            and any(isinstance(name, str) and name.split(".")[-1] == "cls_token" for name in value)]
    if not held:
        return ""
    return (f"; the weights look to be under {', '.join(map(repr, held))}: save {'that' if len(held) == 1 else 'one'} "
            f"alone and load it, e.g. torch.save(torch.load({str(path)!r}, weights_only=True)[{held[0]!r}], "
            f"'model.pth')")


def _check_unprefixed(state: dict, path: Path) -> None:
    """A wrapper's state dict, or a larger model's, holds the encoder's keys under a prefix: said so, with how to
    take them out, rather than as every key (or every layer, or cls_token) missing. Never stripped here: which
    keys are the encoder's is the user's to say (a classifier's head under the same prefix is no weight of it)."""
    prefixed = next((key for key in state if key.endswith(".cls_token")), None)
    if prefixed and "cls_token" not in state:
        prefix = prefixed[: -len("cls_token")]
        holder = ("a wrapper's state dict (torch.compile's, DistributedDataParallel's) holds them; save the model it "
                  "wraps instead, or" if set(prefix[:-1].split(".")) <= set(WRAPPER_ATTRIBUTES) else
                  "a model holding the encoder as one of its parts (a classifier, a student/teacher pair) holds them;")
        raise ValueError(f"{path}: its keys are under the prefix {prefix!r} ({prefixed}, not cls_token), as {holder} "
                         f"save the encoder's keys alone, without the prefix: {{key.removeprefix({prefix!r}): value "
                         f"for key, value in state_dict.items() if key.startswith({prefix!r})}}")


def _read_state_dict(path: Path) -> tuple[dict, dict]:
    """(flat state dict, saved config or {}) from a safetensors file or a torch checkpoint."""
    if _file_format(path) == "safetensors":
        state, saved = _read_safetensors(path)
    else:
        state, saved = _read_torch(path), {}
    _check_unprefixed(state, path)
    not_floating = [f"{key} ({value.dtype})" for key, value in state.items() if not value.is_floating_point()]
    if not_floating:  # casting them to float32 would load a model of truncated or zeroed weights
        raise ValueError(f"{path}: weights must be floating point; these are not: {first_items(not_floating)}")
    not_dense = [f"{key} ({value.layout})" for key, value in state.items() if value.layout != torch.strided]
    if not_dense:  # the finiteness and shape checks would fail inside torch on them
        raise ValueError(f"{path}: weights must be dense tensors; these are not: {first_items(not_dense)} (save "
                         f"them with .to_dense())")
    on_meta = [key for key, value in state.items() if value.is_meta]
    if on_meta:  # the finiteness check failed inside torch ("Tensor.item() cannot be called on meta tensors")
        raise ValueError(f"{path}: holds no weights: these are meta tensors, which have shapes and no values (saved "
                         f"from a model made on the meta device before its weights were loaded): "
                         f"{first_items(on_meta)}")
    return state, saved


def infer_config(state: dict, **overrides) -> EchoConfig:
    """The config a state dict was saved from: dim from `cls_token`, depth from the layer keys, the MLP ratio from
    the first layer's MLP, heads from the preset of that (dim, depth) (heads cannot be read from shapes), or head
    dim 64 for a custom size.
    `overrides` replace any of these; the shapes are checked against the result afterwards."""
    if "cls_token" not in state:
        raise ValueError("no 'cls_token': not an ECHO encoder state dict (missing key cls_token)")
    if state["cls_token"].dim() != 3:
        raise ValueError(f"mis-shaped key cls_token {tuple(state['cls_token'].shape)} (expected (1, 1, dim))")
    layers = {int(m.group(1)) for key in state if (m := LAYER_KEY.match(key))}
    dim = overrides.pop("dim", state["cls_token"].shape[-1])
    depth = overrides.pop("depth", max(layers) + 1 if layers else 0)
    # numpy's integers too (a 6-head default for depth=np.int64(12)); anything else EchoConfig refuses
    whole_sizes = all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in (dim, depth))
    if "heads" not in overrides and whole_sizes:
        preset = next((p for p in PRESETS.values() if (p.dim, p.depth) == (dim, depth)), None)
        if preset is not None:
            overrides["heads"] = preset.heads
        elif dim % 64 == 0:
            overrides["heads"] = dim // 64
        else:
            raise ValueError(f"unknown size: dim {dim}, depth {depth} matches no preset; pass heads=")
    hidden = state.get("encoder.layers.0.linear1.weight")
    if "mlp_ratio" not in overrides and whole_sizes and dim and hidden is not None and hidden.dim() == 2 \
            and hidden.shape[1] == dim and hidden.shape[0] % dim == 0:  # a file of another ratio was "mis-shaped"
        overrides["mlp_ratio"] = hidden.shape[0] // dim
    return EchoConfig(dim=dim, depth=depth, **overrides)


def _described(config: EchoConfig) -> str:
    """The model a file must match, as the errors name it."""
    return f"ECHO-{config.size or 'custom'} (dim {config.dim}, depth {config.depth})"


def _check_size(config: EchoConfig, state: dict, source: str) -> None:
    """The file's encoder layers must be 0 .. depth-1, and its cls_token (1, 1, dim). Checked before any model is
    built: a stray key such as encoder.layers.50000.x (or a metadata depth of 50000) would otherwise build 50001
    layers, tens of GB, only to report them; and even on the meta device a model computes its pos_embed table
    (126 x dim), so a metadata dim of 2**40 failed as numpy's MemoryError."""
    cls_token = state.get("cls_token")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, config.dim):
        raise ValueError(f"{source}: does not match {_described(config)}; mis-shaped keys: cls_token "
                         f"{tuple(cls_token.shape)} (expected (1, 1, {config.dim}))")
    held = {int(m.group(1)) for key in state if (m := LAYER_KEY.match(key))}
    unexpected = sorted(index for index in held if index >= config.depth)
    missing_count = config.depth - (len(held) - len(unexpected))
    if not unexpected and not missing_count:
        return
    problems = []
    if missing_count:
        missing = [str(index) for index in itertools.islice((i for i in range(config.depth) if i not in held), 8)]
        more = f", ... ({missing_count} in all)" if missing_count > len(missing) else ""
        problems.append(f"missing layers: {', '.join(missing)}{more}")
    if unexpected:
        problems.append(f"unexpected layers: {first_items(unexpected)}")
    raise ValueError(f"{source}: does not match {_described(config)}; " + "; ".join(problems)
                     + f" (it holds {len(held)} layers"
                     + (f", numbered up to {max(held)})" if held else ")"))


def _non_finite(weights: dict) -> list[str]:
    """The keys holding NaN or Inf, each with how many (counted in float32: float8_e4m3fn has no isfinite)."""
    counts = {key: int((~torch.isfinite(value.float())).sum()) for key, value in weights.items()}
    return [f"{key} ({count} of {weights[key].numel()} values)" for key, count in counts.items() if count]


def _float32_weights(state: dict, source: str) -> dict:
    """The weights in float32, all finite: a NaN or Inf (or a float64 value beyond float32's range) would load
    a model whose embeddings are NaN."""
    weights = {key: value.to(torch.float32) for key, value in state.items()}
    non_finite = _non_finite(weights)
    if non_finite:
        raise ValueError(f"{source}: weights must be finite; these hold NaN or Inf (in float32, which they are "
                         f"loaded as): {first_items(non_finite)}")
    return weights


def check_state_dict(model: EchoModel, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [f"{label}: {first_items(keys)}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", misshaped))
                if keys]
    if problems:
        raise ValueError(f"{source}: does not match {_described(model.config)}; " + "; ".join(problems))


def _export_command(run: Path) -> str:
    return (f"`python -m echo pretrain --out {run} --export-only` writes {run / 'model.safetensors'} from its newest "
            f"checkpoint")


def _looks_like_name(path: str) -> bool:
    """'echo-base', not 'weights/model.pth' nor '~' (the home folder, as a shell reads it): a missing path of this
    shape is reported as an unknown name."""
    return "/" not in path and os.sep not in path and not path.startswith("~") and not Path(path).suffix


def _checkpoint_file(path) -> tuple[Path, str | None]:
    """The file `path` names, and the release name it was resolved from through echo.hub (None for a path or
    "default"). A folder holding one checkpoint file (a pretraining run's, or echo.save's) names that file;
    one holding several is refused, naming them, rather than guessing which was meant."""
    if not isinstance(path, (str, os.PathLike)):  # pathlib's TypeError would name neither load nor its argument
        raise ValueError(f"echo.load takes a checkpoint path or name, got {type(path).__name__} {path!r:.80}")
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"no checkpoint given (an empty path); give a checkpoint file or a name: "
                         f"{', '.join(hub.NAMES)}")
    # os.path's tests, not pathlib's: those raised OSError "File name too long" for a long name or path
    if isinstance(path, str) and not os.path.exists(path) and _looks_like_name(path):
        return hub.resolve(path), path if path in hub.RELEASES else None
    path = Path(path).expanduser()  # "~/models/x.safetensors", as a shell would read it
    if os.path.isdir(path):
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
        if len(inside) == 1:
            return _checkpoint_file(path / inside[0])
        if not inside and (path / "checkpoints").is_dir():  # a pretraining run before its export
            raise ValueError(f"{path} is a pretraining run with no model file yet: {_export_command(path)}")
        if inside and all(PRETRAINING_CHECKPOINT.match(name) for name in inside):  # its checkpoints/: none loads
            raise ValueError(f"{path} holds a pretraining run's checkpoints ({first_items(inside)}), which are no "
                             f"model files: {_export_command(path.parent)}")
        hint = f"; it holds {first_items(inside)}: load one of those by path" if inside else ""
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if os.path.islink(path) and not os.path.exists(path):
        raise MissingCheckpoint(f"checkpoint {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if not os.path.exists(path):
        raise MissingCheckpoint(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):  # /dev/null, a pipe: each read of it gives other bytes, or none
        raise ValueError(f"checkpoint {path} is not a regular file")
    return path, None


def load(path, size: str | None = None, device=None, heads: int | None = None, **overrides) -> EchoModel:
    """An EchoModel in eval mode from a checkpoint file, or by name ("default", "echo-small", "echo-tiny":
    see echo.hub), in float32 on `device` (the CPU by default) whatever torch's default device and dtype. `size`
    forces a preset; `heads` and other keyword arguments override config fields (e.g. final_norm_eps=1e-5),
    whether the config comes from the file's metadata or from its shapes."""
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; valid: size, device, "
                         f"{', '.join(CONFIG_FIELDS)}")
    if heads is not None:
        overrides["heads"] = heads
    device = None if device is None else checked_device(device)
    path, release = _checkpoint_file(path)
    if release is not None:  # echo-small is ECHO-small, whatever file the cache holds
        if size not in (None, hub.RELEASES[release].size):
            raise ValueError(f"{release} is ECHO-{hub.RELEASES[release].size}: size={size!r} contradicts it")
        size = hub.RELEASES[release].size
    try:
        state, saved = _read_state_dict(path)
        if release is not None:  # another model in the cache's place is as wrong as a file cut short
            _check_size(EchoConfig.preset(size), state, str(path))
    except ValueError as error:
        if release is None:
            raise
        raise hub.damaged(release, path, error) from None
    try:
        if size is not None:  # the preset gives the size; the file's other fields (eps) still apply
            kept = {key: value for key, value in saved.items() if key not in SIZE_FIELDS}
            config = EchoConfig.preset(size, **{**kept, **overrides})
        else:  # fields the metadata lacks come from the shapes, not from EchoConfig's defaults (small's heads)
            config = infer_config(state, **{**saved, **overrides})
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    _check_size(config, state, str(path))
    with torch.device("meta"):  # shapes checked without allocating a model the file may not fit
        model = EchoModel(config)
    check_state_dict(model, state, str(path))
    weights = _float32_weights(state, str(path))
    del state
    # The weights become the parameters, on `device` in float32 whatever torch's default device and dtype (a
    # user's set_default_device("meta") gave a model without weights): not copied into a model allocated first,
    # which held them twice, and whose allocation from the meta device (to_empty) imported torch's symbolic
    # shapes and sympy, ~1 s of every command's start.
    model.load_state_dict(_owned(weights, device or "cpu"), strict=True, assign=True)
    return model.eval()


def _owned(weights: dict, device) -> dict:
    """The weights on `device`, each in a storage of its own: a torch checkpoint may hold views of one tensor
    (two keys sharing it would train as one parameter) or of a larger one (kept whole in memory)."""
    owned, storages = {}, set()
    for key, value in weights.items():
        value = value.to(device)
        storage = value.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != value.nbytes or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        storages.add(value.untyped_storage().data_ptr())
        owned[key] = value
    return owned


def _check_saveable(model) -> None:
    """An EchoModel itself: a wrapper's state dict (torch.compile's, DistributedDataParallel's) holds its keys
    under a prefix, and a file of those would be refused by echo.load."""
    if isinstance(model, EchoModel):
        return
    wrapped = next((name for name in WRAPPER_ATTRIBUTES if isinstance(getattr(model, name, None), EchoModel)), None)
    hint = f"; pass the model it wraps, its .{wrapped}" if wrapped else ""
    raise ValueError(f"save takes an EchoModel, got {type(model).__name__}{hint}")


def save(model: EchoModel, path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `path` (.safetensors, the released flat key layout, config in its metadata) and a `.json`
    config beside it, each whole or not at all (echo.atomic). `~` is expanded, as echo.load expands it."""
    _check_saveable(model)
    if not isinstance(path, (str, os.PathLike)):  # pathlib's TypeError would name neither save nor its argument
        raise ValueError(f"save takes a .safetensors path, got {type(path).__name__} {path!r:.80}")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"save writes .safetensors files, got {path.name}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"save's dtype is a torch dtype such as torch.float16, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"save needs a floating-point dtype, got {dtype}: weights would be truncated")
    if path.is_dir():
        raise ValueError(f"save writes a file, and {path} is a folder")
    if path.with_suffix(".json").is_dir():  # the weights were written, then the config failed: half a pair
        raise ValueError(f"save writes {path} and its config {path.with_suffix('.json').name} beside it, and "
                         f"{path.with_suffix('.json')} is a folder")
    weights = model.state_dict()
    on_meta = [key for key, value in weights.items() if value.is_meta]
    if on_meta:  # copying them out failed inside torch ("Cannot copy out of meta tensor; no data!")
        raise ValueError(f"{path}: not written: the model's weights are on the meta device, which holds shapes and "
                         f"no values (load or initialise them first): {first_items(on_meta)}")
    with torch.device("meta"):  # a model cut to fewer layers, or given a head, made a file echo.load refused
        check_state_dict(EchoModel(model.config), weights, f"{path}: not written: the model's weights, which "
                                                           f"echo.load would refuse")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.items()}
    non_finite = _non_finite(state)
    if non_finite:  # a diverged model, or weights beyond the dtype's range (float16's 65504): a file load refuses
        raise ValueError(f"{path}: not written: these weights hold NaN or Inf in {dtype} (in the model, or beyond "
                         f"that dtype's range), which echo.load refuses: {first_items(non_finite)}")
    atomic.nearest_folder(path.parent, str(path))  # a file where a folder should be: "File exists", naming neither
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model.config.to_dict())
    try:
        with atomic.replacing(path) as temporary:
            save_file(state, str(temporary), metadata={CONFIG_KEY: config})
    except SafetensorError as error:  # a full disk, in safetensors' own type, which the command lines do not catch
        raise OSError(f"{path} could not be written: {error}") from error
    atomic.write_text(path.with_suffix(".json"), json.dumps(model.config.to_dict(), indent=2) + "\n")
    return path
