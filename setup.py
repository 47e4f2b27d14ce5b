"""Packaging lives in pyproject.toml; this file exists to build the optional compiled extension (csrc/)."""
from setuptools import setup

setup()
