"""Evaluation of frozen ECHO embeddings with the SIREN protocol: nearest-neighbour anomaly detection
(DCASE Task 2, 2020-2025) and fault classification (CWRU, MAFAULDA, IDMT-ISA), no training of the encoder.

    embed      files -> utterance embeddings through echo.fast.encode, cached on disk
    neighbors  exact k-nearest-neighbour search by chunked matrix products (faiss optional)
    anomaly    DCASE memory-bank scoring, groups, AUC/pAUC and the yearly scores
    faults     kNN classification: LOOCV, stratified k-fold, given split, multi-channel fusion
    datasets   adapters for the published folder layouts and users' own folders
    plots      ROC curves, score histograms, confusion matrices, 2-D projections
    cli        `python -m echo eval ...`
"""
from __future__ import annotations

import importlib

EXTRA_HINT = "pip install 'echo-fm[eval]'"


def require(module: str, purpose: str):
    """Import an optional dependency, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        package = {"sklearn": "scikit-learn", "faiss": "faiss-cpu"}.get(top, top)  # pip's names
        raise ImportError(f"{purpose} needs the package {package!r}, which is not installed: {EXTRA_HINT}") from None
