"""echo: the ECHO foundation model for machine signals, at any sample rate and any length.

The names below load on first use, so `python -m echo --help` answers without importing torch, and a Ctrl-C
while torch loads reaches the command line's handler instead of printing a traceback."""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import load, save
    from .model import PRESETS, EchoConfig, EchoModel

__all__ = ["EchoConfig", "EchoModel", "PRESETS", "load", "save"]
__version__ = "0.1.0"

_HOMES = {"load": ".checkpoint", "save": ".checkpoint", "PRESETS": ".model", "EchoConfig": ".model",
          "EchoModel": ".model"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `echo.fast` etc. after a bare `import echo`
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
