"""Loading and saving ECHO weights: released `.safetensors` / `.pth` files and echo's own.

Only safetensors and `torch.load(weights_only=True)` are used, so no file can run code on load. Loading is
strict: a missing, unexpected or mis-shaped key is an error that names the keys.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import PRESETS, EchoConfig, EchoModel

CONFIG_KEY = "echo_config"  # safetensors metadata entry holding the JSON config
LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")


def _read_state_dict(path: Path) -> tuple[dict, dict]:
    """(flat state dict, saved config or {}) from a .safetensors or .pth/.pt file."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        return state, json.loads(metadata.get(CONFIG_KEY, "{}"))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers, and echo never "
            f"unpickles arbitrary objects ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from None
    if isinstance(obj, dict) and isinstance(obj.get("encoder"), dict):
        obj = obj["encoder"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors, or one under the key 'encoder'")
    return obj, {}


def infer_config(state: dict, size: str | None = None, heads: int | None = None, **overrides) -> EchoConfig:
    """The config a state dict was saved from: dim from `cls_token`, depth from the layer keys, heads from the
    preset of that (dim, depth) (heads cannot be read from shapes), or head dim 64 for a custom size."""
    if size is not None:
        config = EchoConfig.preset(size, **({"heads": heads} if heads else {}), **overrides)
        return config
    if "cls_token" not in state:
        raise ValueError("checkpoint has no 'cls_token': not an ECHO encoder state dict (missing key cls_token)")
    dim = state["cls_token"].shape[-1]
    layers = {int(m.group(1)) for key in state if (m := LAYER_KEY.match(key))}
    depth = max(layers) + 1 if layers else 0
    preset = next((p for p in PRESETS.values() if (p.dim, p.depth) == (dim, depth)), None)
    if heads is None:
        if preset is not None:
            heads = preset.heads
        elif dim % 64 == 0:
            heads = dim // 64
        else:
            raise ValueError(f"unknown size: dim {dim}, depth {depth} matches no preset; pass heads=")
    return EchoConfig(dim=dim, depth=depth, heads=heads, **overrides)


def check_state_dict(model: EchoModel, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source}: does not match ECHO-{model.config.size or 'custom'} "
                         f"(dim {model.config.dim}, depth {model.config.depth}); " + "; ".join(problems))


def load(path, size: str | None = None, device=None, heads: int | None = None, **overrides) -> EchoModel:
    """An EchoModel in eval mode from a checkpoint file, or by name ("default", "echo-small", "echo-tiny":
    see echo.hub). `size` forces a preset; `heads` overrides the preset's head count; other keyword
    arguments override config fields (e.g. final_norm_eps=1e-5)."""
    if isinstance(path, str) and not Path(path).exists():
        from . import hub

        if path in hub.NAMES:
            path = hub.resolve(path)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    state, saved = _read_state_dict(path)
    if saved and size is None:
        config = EchoConfig(**{**saved, **({"heads": heads} if heads else {}), **overrides})
    else:
        config = infer_config(state, size, heads, **overrides)
    model = EchoModel(config)
    check_state_dict(model, state, str(path))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.to(device).eval() if device is not None else model.eval()


def save(model: EchoModel, path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `path` (.safetensors, the released flat key layout, config in its metadata) and a `.json`
    config beside it. Both are written to a temporary file and renamed, so a crash leaves no half file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save writes .safetensors files, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(model.config.to_dict())
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata={CONFIG_KEY: config})
    os.replace(temporary, path)
    config_path = path.with_suffix(".json")
    temporary = config_path.with_name(config_path.name + ".tmp")
    temporary.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    os.replace(temporary, config_path)
    return path
