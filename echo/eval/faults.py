"""Fault classification by k-nearest neighbours on frozen embeddings (the SIREN protocol).

k = 5, Euclidean distance on the raw embeddings, majority vote; a tied vote goes to the tied label met first
in ascending-distance order. Protocols: leave-one-file-out (the query is never its own neighbour), stratified
k-fold (5 folds, seed 1: accuracy of the pooled predictions, plus per-fold mean and population std) and a
given train/test split. Where a data set groups its files (segments cut from one recording), a group stays on
one side: group folds, and leave-one-group-out. Multi-channel embeddings (rows, channels, features) are scored on all channels
concatenated, on each channel alone, and by the fused distance of `neighbors.fused_nearest`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..inputs import whole_number
from ..wording import counted
from . import neighbors, require

PROTOCOLS = ("loocv", "kfold", "split")


def vote(neighbor_labels: np.ndarray) -> np.ndarray:
    """(Q, k) integer labels in ascending-distance order -> (Q,) majority label; ties to the earliest."""
    neighbor_labels = np.asarray(neighbor_labels)
    counts = np.zeros((neighbor_labels.shape[0], neighbor_labels.max() + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(neighbor_labels.shape[0])[:, None], neighbor_labels), 1)
    votes = np.take_along_axis(counts, neighbor_labels, axis=1)  # each neighbour's label count
    first_winner = np.argmax(votes == votes.max(axis=1, keepdims=True), axis=1)
    return neighbor_labels[np.arange(len(neighbor_labels)), first_winner]


def _as_channels(embeddings) -> np.ndarray:
    embeddings = neighbors.as_rows(embeddings)
    if embeddings.ndim == 2:
        return embeddings[:, None, :]
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (rows, features) or (rows, channels, features), "
                         f"got shape {embeddings.shape}")
    return embeddings


def _flat(embeddings: np.ndarray, channels: list) -> np.ndarray:
    """The chosen channels of (rows, channels, features) as (rows, features): a view where they are consecutive
    (all of them, or one), not a copy of the embeddings for every search."""
    if channels == list(range(channels[0], channels[-1] + 1)):
        return embeddings[:, channels[0]:channels[-1] + 1].reshape(len(embeddings), -1)
    return embeddings[:, channels].reshape(len(embeddings), -1)


def predict(bank, bank_codes, queries, k: int = 5, channels=None, fuse: bool = False, exclude=None,
            device=None, groups=None) -> np.ndarray:
    """kNN predictions (label codes) for `queries` against `bank` on the chosen channels. `groups`: as
    `neighbors.nearest`'s."""
    bank, queries = _as_channels(bank), _as_channels(queries)
    channels = neighbors.chosen_channels(channels, bank.shape[1])
    if fuse:
        _, indices = neighbors.fused_nearest(queries, bank, k, channels, exclude, device, groups=groups)
    else:
        _, indices = neighbors.nearest(_flat(queries, channels), _flat(bank, channels), k, "euclidean", exclude,
                                       device, groups=groups)
    return vote(np.asarray(bank_codes)[indices])


@dataclass
class FaultResult:
    """One evaluation: the true and predicted label of every file queried, and their scores (`row()` for a
    table). fold_accuracies: each fold's accuracy, for the k-fold protocol."""

    protocol: str
    view: str  # which channels: "all", "channel 3", "fused 0,1,2"
    classes: list
    y_true: np.ndarray
    y_pred: np.ndarray
    accuracy: float
    precision: float  # weighted over classes, as scikit-learn's average="weighted"
    recall: float
    f1: float
    confusion: np.ndarray  # rows: true class, columns: predicted, in `classes` order
    fold_accuracies: list = field(default_factory=list)

    def row(self) -> dict:
        """The scores as one table row: protocol, view, files, accuracy, precision, recall, f1 (and the folds'
        accuracy mean and std for k-fold)."""
        row = {"protocol": self.protocol, "view": self.view, "files": len(self.y_true),
               "accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1}
        if self.fold_accuracies:
            row["fold_mean"] = float(np.mean(self.fold_accuracies))
            row["fold_std"] = float(np.std(self.fold_accuracies))
        return row


def score(y_true, y_pred, classes, protocol: str, view: str, fold_accuracies=()) -> FaultResult:
    """The FaultResult of predictions `y_pred` of labels `y_true`, scored over `classes`."""
    metrics = require("sklearn.metrics", "computing fault classification metrics")
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="weighted", zero_division=0)
    return FaultResult(protocol, view, list(classes), np.asarray(y_true), np.asarray(y_pred),
                       float(metrics.accuracy_score(y_true, y_pred)), float(precision), float(recall), float(f1),
                       metrics.confusion_matrix(y_true, y_pred, labels=classes), list(fold_accuracies))


def view_name(channels, fuse: bool, n_channels: int) -> str:
    """The results' name of a channel view: "all", "channel 3", "channels 0,2" or "fused 0,1,2"."""
    if channels is None or (not fuse and list(channels) == list(range(n_channels))):
        return "all" if not fuse else "fused " + ",".join(map(str, range(n_channels)))
    return ("fused " if fuse else "channel " if len(channels) == 1 else "channels ") + ",".join(map(str, channels))


def class_codes(labels) -> tuple[np.ndarray, np.ndarray]:
    """The sorted classes and each label's code in them. One class is refused: every prediction would be
    right, an accuracy of 1 that measures nothing."""
    try:
        classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    except TypeError:  # None among names, say: "'<' not supported between instances of 'NoneType' and 'str'"
        kinds = sorted({type(label).__name__ for label in labels})
        raise ValueError(f"labels must be names or numbers of one kind, got {', '.join(kinds)}") from None
    if len(classes) < 2:
        raise ValueError(f"fault classification needs two classes or more; every file is {str(classes[0])!r}")
    return classes, codes


def fold_splits(labels, folds: int, seed: int, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The k-fold protocol's (train, test) rows of `labels`: stratified folds (stratified group folds where
    files are grouped) shuffled by `seed`. More folds than the data allows is refused with its class counts:
    scikit-learn names its n_splits, not the data that has too few files."""
    # refused here, not by scikit-learn: its error was read as too many folds for the data ("choose fewer folds")
    count, start = whole_number(folds), whole_number(seed)
    if count is None or count < 2:
        raise ValueError(f"folds must be a whole number, 2 or more, got {folds!r}")
    if start is None or not 0 <= start < 2**32:
        raise ValueError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    selection = require("sklearn.model_selection", "stratified k-fold")
    splitter = (selection.StratifiedKFold if groups is None else selection.StratifiedGroupKFold)(
        n_splits=count, shuffle=True, random_state=start)
    labels = np.asarray(labels)
    try:
        return list(splitter.split(np.zeros(len(labels)), labels, groups))
    except ValueError as error:
        counts = ", ".join(f"{name} {count}" for name, count in zip(*np.unique(labels, return_counts=True)))
        grouped = "" if groups is None else f"; {len(np.unique(groups))} groups"
        raise ValueError(f"{folds}-fold cross-validation of {len(labels)} files (per class: {counts}{grouped}) "
                         f"is impossible: {error} Choose fewer folds (--folds of `echo eval`), or leave-one-out "
                         f"(--protocol loocv).") from None


def banks_and_queries(protocol: str, labels, k: int = 5, subsets=None, groups=None, folds: int = 5,
                      seed: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """The protocol's searches over the rows of `labels`: (bank rows, query rows, each query's own row left
    out of the bank or None). What the data cannot take, k above the smallest bank included, is refused here
    before any search, so the command can refuse it before the encoding on the files as listed."""
    labels = np.asarray(labels)
    k = neighbors.neighbour_count(k)  # before it is compared with the banks: k="5" failed there with a TypeError
    everything = np.arange(len(labels))
    if protocol == "loocv" and groups is None:
        searches, bank = [(everything, everything, everything)], "every file but the query"
    elif protocol == "loocv":
        groups = np.asarray(groups)
        names = np.unique(groups)
        if len(names) < 2:  # the only group's bank would be empty
            raise ValueError(f"leave-one-group-out needs two groups or more, got {len(names)}")
        searches = [(everything[groups != name], everything[groups == name], None) for name in names]
        bank = "the files outside the largest group"
    elif protocol == "kfold":
        searches = [(train, test, None) for train, test in fold_splits(labels, folds, seed, groups)]
        bank = f"the smallest training part of the {folds} folds"
    elif protocol == "split":
        if subsets is None:
            raise ValueError("protocol 'split' needs a train/test subset for every file")
        subsets = np.asarray(subsets)
        train, test = everything[subsets == "train"], everything[subsets == "test"]
        if not len(train) or not len(test):
            raise ValueError(f"protocol 'split' needs train and test files, got {len(train)} train and "
                             f"{len(test)} test")
        searches, bank = [(train, test, None)], "the train files"
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    smallest = min(len(rows) - (own is not None) for rows, _, own in searches)
    if k > smallest:
        raise ValueError(f"k={k} neighbours asked of the {protocol} protocol's bank of {counted(smallest, 'file')} "
                         f"({bank}): choose a smaller k")
    return searches


def _rows(embeddings: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The chosen rows: the embeddings themselves where that is every row in order (leave-one-out's bank and
    queries), not a copy of them for each search."""
    return embeddings if np.array_equal(chosen, np.arange(len(embeddings))) else embeddings[chosen]


def evaluate(embeddings, labels, protocol: str, k: int = 5, subsets=None, channels=None, fuse: bool = False,
             folds: int = 5, seed: int = 1, device=None, groups=None) -> FaultResult:
    """kNN fault classification of `embeddings` ((N, E), or (N, C, E) per channel) with their `labels`, by
    `protocol`: "loocv" (leave one out), "kfold" (`folds` stratified folds shuffled by `seed`) or "split", each
    query the majority label of its `k` nearest. `channels` (all by default) are searched concatenated, or with
    `fuse` by the fused distance (neighbors.fused_nearest); `device`: where the search runs.
    `subsets` ("train"/"test" per row) is needed for "split". `groups`
    (one per row: the recording a file was cut from) keeps a group on one side: folds are stratified group
    folds, and leave-one-out leaves the query's whole group out of the bank (segments of one recording would
    otherwise find each other)."""
    embeddings = _as_channels(embeddings)
    labels = np.asarray(labels)
    if labels.ndim != 1:  # a table's label column as an (N, 1) array failed deep in the vote
        raise ValueError(f"labels must be one per embedding, a flat list; got shape {labels.shape}")
    for name, values in (("labels", labels), ("subsets", subsets), ("groups", groups)):
        if values is not None and len(values) != len(embeddings):
            raise ValueError(f"{len(values)} {name} for {len(embeddings)} embeddings")
    classes, codes = class_codes(labels)
    if channels is not None:  # as ints, once: each search and the view's name read them (1.0 was "channel 1.0")
        channels = neighbors.chosen_channels(channels, embeddings.shape[1])
    searches = [(bank, queries, own, None) for bank, queries, own in
                banks_and_queries(protocol, labels, k, subsets, groups, folds, seed)]
    everything = np.arange(len(labels))
    if protocol == "loocv" and groups is not None:
        # one search that leaves each query's group out of the bank, not one per group: each of those prepared
        # nearly every row again (36 groups of 10^4 files: 90 s, against 22 s)
        searches = [(everything, everything, None, (groups, groups))]
    predictions = np.empty_like(labels)
    queried = np.zeros(len(labels), dtype=bool)
    fold_accuracies = []
    for bank, queries, own, own_groups in searches:
        predictions[queries] = classes[predict(_rows(embeddings, bank), codes[bank], _rows(embeddings, queries), k,
                                               channels, fuse, own, device, own_groups)]
        queried[queries] = True
        if protocol == "kfold":
            fold_accuracies.append(float(np.mean(predictions[queries] == labels[queries])))
    return score(labels[queried], predictions[queried], classes, protocol,
                 view_name(channels, fuse, embeddings.shape[1]), fold_accuracies)
