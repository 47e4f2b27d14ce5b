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

PIP_NAMES = {"sklearn": "scikit-learn", "faiss": "faiss-cpu"}
# The smallest extra of pyproject.toml that installs a package (the rest come with `eval`): reading audio for
# `python -m echo encode` should not pull scikit-learn and matplotlib.
EXTRAS = {"soundfile": "audio", "faiss": "faiss"}


def require(module: str, purpose: str):
    """Import an optional dependency, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as error:  # OSError: installed, but its C library is not (soundfile's libsndfile)
        top = module.split(".")[0]
        state = "which is not installed" if isinstance(error, ImportError) else f"which does not load ({error})"
        raise ImportError(f"{purpose} needs the package {PIP_NAMES.get(top, top)!r}, {state}: "
                          f"pip install 'echo-fm[{EXTRAS.get(top, 'eval')}]'") from None
