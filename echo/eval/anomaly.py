"""DCASE Task 2 (2020-2025) anomaly detection with a memory bank of normal training clips (SIREN protocol).

Bank: the training clips of one (split, machine type, section); dev and eval are never mixed. 2020 keys the
bank by machine id (stored as `section`), 2021-2025 by section, with source and target training clips in one
bank (the min over both = 1-NN over their union). Score of a test clip = cosine distance to its nearest bank
clip (1 - max cosine similarity).

Groups (scikit-learn: AUC = roc_auc_score, pAUC = roc_auc_score(max_fpr=0.1)):
  2020       AUC and pAUC per (machine, id)
  2021       AUC and pAUC per (machine, section, domain), on that domain's test clips
  2022-2025  AUC per (machine, section, domain); pAUC per (machine, section) over both domains. The domain
             AUC follows `domain_rule`: "official" (the DCASE evaluators: normals of the domain + anomalies of
             both domains) or "siren" (the SIREN tables: normals and anomalies of the domain only).
A group holding one class only is reported in `excluded`, never scored 0.

Scores: per split the official score, the harmonic mean of every AUC and pAUC of the year, each floored at
`eps` (2021-2025), the arithmetic mean in 2020; and the paper's yearly figure, the same mean over the pooled
dev + eval values.
"""
from __future__ import annotations

import numbers
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..wording import counted
from . import neighbors, require

YEARS = tuple(range(2020, 2026))
DOMAIN_RULES = ("official", "siren")
MAX_FPR = 0.1
HMEAN_EPS = sys.float_info.epsilon


@dataclass(frozen=True)
class Clip:
    """One clip of an anomaly-detection task, with what the DCASE scoring groups it by."""

    path: Path
    split: str  # "dev" or "eval"
    machine: str
    section: str  # "00", ...; the machine id in 2020
    domain: str | None  # "source" / "target"; None in 2020
    subset: str  # "train" or "test"
    label: int | None  # 0 normal, 1 anomalous, None unknown (unlabelled eval clips)


def check_year(year: int | None) -> int | None:
    """A DCASE year, or None for a user's folder (one bank per machine, no domains, scored as 2020)."""
    if year is not None and year not in YEARS:
        raise ValueError(f"DCASE year {year!r} is not supported; supported: {YEARS[0]}-{YEARS[-1]}")
    return year


def score_clips(clips: list[Clip], embeddings, device=None, backend: str = "torch") -> np.ndarray:
    """Cosine 1-NN distance of every test clip to the training clips of its (split, machine, section), its bank:
    a float64 array (N,) in the clips' order, NaN for training clips."""
    embeddings = neighbors.as_rows(embeddings)
    neighbors.check_nonzero(embeddings, "embeddings")  # by the row given, not by its place in a group
    if len(embeddings) != len(clips):
        raise ValueError(f"{len(embeddings)} embeddings for {len(clips)} clips")
    groups = defaultdict(lambda: ([], []))
    for index, clip in enumerate(clips):
        if clip.subset not in ("train", "test"):  # "Test" joined the bank: a test clip scored by itself, unscored
            raise ValueError(f"{clip.path}: subset {clip.subset!r} is neither 'train' (memory bank) nor 'test'")
        groups[(clip.split, clip.machine, clip.section)][clip.subset == "test"].append(index)
    scores = np.full(len(clips), np.nan)
    for (split, machine, section), (bank, tests) in sorted(groups.items()):
        if tests and not bank:
            raise ValueError(f"{split} {machine} section {section}: {counted(len(tests), 'test clip')} but no training "
                             f"clip to build the memory bank from")
        if tests:
            # In float64: 1 - cos of close clips (a model's embeddings of one machine differ by ~1 %) is ~1e-5,
            # where float32 keeps 2-3 digits, and ties then break with the summation order (thread count).
            distances, _ = neighbors.nearest(embeddings[tests].astype(np.float64),
                                             embeddings[bank].astype(np.float64), 1, "cosine", device=device,
                                             backend=backend)
            scores[tests] = distances[:, 0]
    return scores


def _metric_rows(key: dict, labels: np.ndarray, scores: np.ndarray, metrics: tuple, rows: list, excluded: list):
    normals, anomalies = int((labels == 0).sum()), int((labels == 1).sum())
    if not normals or not anomalies:
        excluded.append({**key, "metrics": "+".join(metrics), "normals": normals, "anomalies": anomalies,
                         "reason": "one class only"})
        return
    sklearn_metrics = require("sklearn.metrics", "computing AUC/pAUC")
    for metric in metrics:
        value = sklearn_metrics.roc_auc_score(labels, scores, max_fpr=MAX_FPR if metric == "pAUC" else None)
        rows.append({**key, "metric": metric, "value": float(value), "normals": normals, "anomalies": anomalies})


def _check_labelled(clip: Clip, year: int | None) -> None:
    """A label or domain no group matches (a label read from a csv as the text "1", a domain "Source") would
    drop the clip from every count unseen, and its group as "one class only"."""
    if clip.label not in (0, 1):
        raise ValueError(f"{clip.path}: label {clip.label!r} is neither 0 (normal) nor 1 (anomalous)")
    if year not in (2020, None) and clip.domain not in ("source", "target"):
        raise ValueError(f"{clip.path}: domain {clip.domain!r} is neither 'source' nor 'target' (DCASE {year})")


def group_metrics(clips: list[Clip], scores, year: int | None, domain_rule: str = "official") -> tuple[list, list]:
    """(rows, excluded): one row per (group, metric) with its value; excluded one-class groups."""
    check_year(year)
    if domain_rule not in DOMAIN_RULES:
        raise ValueError(f"unknown domain AUC rule {domain_rule!r}; known: {', '.join(DOMAIN_RULES)}")
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(clips):  # fewer failed deep in the groups; more paired every clip with a wrong score
        raise ValueError(f"{len(scores)} scores for {len(clips)} clips")
    tests = defaultdict(list)
    for index, clip in enumerate(clips):
        if clip.subset == "test" and clip.label is not None:
            _check_labelled(clip, year)
            if not np.isfinite(scores[index]).all():  # scikit-learn's "Input contains NaN" names no clip
                raise ValueError(f"{clip.path}: score {scores[index]} is not a finite number")
            tests[(clip.split, clip.machine, clip.section)].append(index)
    rows, excluded = [], []
    for (split, machine, section), members in sorted(tests.items()):
        members = np.asarray(members)
        labels = np.array([clips[i].label for i in members])
        domains = np.array([clips[i].domain for i in members])
        key = {"split": split, "machine": machine, "section": section}
        if year in (2020, None):
            _metric_rows({**key, "domain": ""}, labels, scores[members], ("AUC", "pAUC"), rows, excluded)
            continue
        for domain in ("source", "target"):
            own = domains == domain
            if year == 2021:
                _metric_rows({**key, "domain": domain}, labels[own], scores[members[own]], ("AUC", "pAUC"),
                             rows, excluded)
                continue
            anomalies = (labels == 1) & own if domain_rule == "siren" else labels == 1
            chosen = own & (labels == 0) | anomalies
            _metric_rows({**key, "domain": domain}, labels[chosen], scores[members[chosen]], ("AUC",), rows,
                         excluded)
        if year >= 2022:
            _metric_rows({**key, "domain": "both"}, labels, scores[members], ("pAUC",), rows, excluded)
    return rows, excluded


def mean_score(values, year: int | None, eps: float = HMEAN_EPS) -> float:
    """The year's official mean: arithmetic in 2020 (and users' folders), harmonic of eps-floored values
    from 2021. `eps` in (0, 1), as `echo eval --eps`: NaN gave NaN scores, 0 or less a 0 for one AUC of 0, 1 or
    more that floor as every score."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise ValueError(f"eps, the harmonic means' floor, must be a number in (0, 1), got {eps!r}")
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan")
    if year in (2020, None):
        return float(values.mean())
    return float(len(values) / np.sum(1 / np.maximum(values, eps)))


def summarise(rows: list, year: int | None, eps: float = HMEAN_EPS) -> dict:
    """{"official score (dev)": ..., "official score (eval)": ..., "yearly figure (dev+eval)": ...}
    for the splits present, plus each split's mean AUC and pAUC alone."""
    summary = {}
    splits = sorted({row["split"] for row in rows})
    for split in splits:
        values = [row["value"] for row in rows if row["split"] == split]
        summary[f"official score ({split})"] = mean_score(values, year, eps)
        for metric in ("AUC", "pAUC"):
            chosen = [row["value"] for row in rows if row["split"] == split and row["metric"] == metric]
            summary[f"{metric} ({split})"] = mean_score(chosen, year, eps)
    if len(splits) > 1:
        summary[f"yearly figure ({'+'.join(splits)})"] = mean_score([row["value"] for row in rows], year, eps)
    return summary
