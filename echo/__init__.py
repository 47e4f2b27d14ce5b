"""echo: the ECHO foundation model for machine signals, at any sample rate and any length."""
from .checkpoint import load, save
from .model import PRESETS, EchoConfig, EchoModel

__all__ = ["EchoConfig", "EchoModel", "PRESETS", "load", "save"]
__version__ = "0.1.0"
