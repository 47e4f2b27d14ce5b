"""kNN fault classification against brute-force loops and hand cases."""
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from echo.eval import faults

from conftest import seeded_rng


def naive_vote(labels_in_distance_order):
    counts = Counter(labels_in_distance_order)
    best = max(counts.values())
    return next(label for label in labels_in_distance_order if counts[label] == best)


def naive_predict(bank, bank_labels, query, k, skip=None):
    distances = [np.inf if j == skip else np.sqrt(((query - b) ** 2).sum()) for j, b in enumerate(bank)]
    order = np.argsort(distances, kind="stable")[:k]
    return naive_vote([bank_labels[j] for j in order])


def clustered(n_per_class=6, classes=("a", "b", "c"), dim=5, spread=1.5):
    rng = seeded_rng()
    centres = rng.normal(size=(len(classes), dim))
    labels = np.repeat(classes, n_per_class)
    points = centres[np.repeat(np.arange(len(classes)), n_per_class)] + spread * rng.normal(size=(len(labels), dim))
    return points, labels


def test_vote_ties_go_to_the_nearest_tied_label():
    got = faults.vote(np.array([[0, 1, 0, 1, 2], [1, 0, 0, 1, 2], [2, 0, 1, 0, 1], [2, 2, 0, 0, 0], [3, 3, 3, 3, 3]]))
    assert got.tolist() == [0, 1, 0, 0, 3]
    rng = seeded_rng()
    random_labels = rng.integers(0, 3, size=(200, 5))
    assert faults.vote(random_labels).tolist() == [naive_vote(list(row)) for row in random_labels]


def test_loocv_matches_brute_force():
    points, labels = clustered()
    result = faults.evaluate(points, labels, "loocv")
    expected = [naive_predict(points, labels, points[i], 5, skip=i) for i in range(len(points))]
    assert result.y_pred.tolist() == expected
    assert result.accuracy == pytest.approx(np.mean(np.array(expected) == labels))


@pytest.mark.parametrize("options, clusters", [({"folds": 5, "seed": 1}, {"n_per_class": 8}),
                                               ({}, {"n_per_class": 10, "spread": 3.0})])
def test_kfold_matches_brute_force(options, clusters):
    """Without folds= or seed=, SIREN's k-fold: 5 stratified folds shuffled with seed 1, k = 5 (an API user relies
    on the defaults; overlapping classes make the folds decide the votes)."""
    points, labels = clustered(**clusters)
    result = faults.evaluate(points, labels, "kfold", **options)
    predictions = np.empty(len(labels), dtype=object)
    fold_accuracies = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=1).split(points, labels):
        for i in test:
            predictions[i] = naive_predict(points[train], labels[train], points[i], 5)
        fold_accuracies.append(np.mean(predictions[test] == labels[test]))
    assert result.y_pred.tolist() == predictions.tolist()
    assert result.fold_accuracies == pytest.approx(fold_accuracies, abs=0)
    row = result.row()
    assert row["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert row["fold_mean"] == pytest.approx(np.mean(fold_accuracies))
    assert row["fold_std"] == pytest.approx(np.sqrt(np.mean((np.array(fold_accuracies) - np.mean(fold_accuracies)) ** 2)))


def test_a_group_never_finds_itself():
    """Segments of one recording (a group) sit near each other: leave-one-out leaves the whole group out of the
    bank, and each fold holds whole groups; brute force decides what the neighbours are."""
    points, labels = clustered(n_per_class=12, spread=2.0)
    rng = seeded_rng()
    groups = np.repeat(np.arange(12), 3)  # four groups per class, three segments each
    points = points + 5 * rng.normal(size=(12, points.shape[1]))[groups]  # a recording's own offset
    result = faults.evaluate(points, labels, "loocv", groups=groups)
    expected = []
    for i in range(len(points)):
        bank = groups != groups[i]
        expected.append(naive_predict(points[bank], labels[bank], points[i], 5))
    assert result.y_pred.tolist() == expected
    assert result.y_pred.tolist() != faults.evaluate(points, labels, "loocv").y_pred.tolist()  # the leak it closes
    from sklearn.model_selection import StratifiedGroupKFold

    result = faults.evaluate(points, labels, "kfold", folds=4, seed=1, groups=groups)
    predictions = np.empty(len(labels), dtype=object)
    for train, test in StratifiedGroupKFold(4, shuffle=True, random_state=1).split(points, labels, groups):
        assert not set(groups[train]) & set(groups[test])
        for i in test:
            predictions[i] = naive_predict(points[train], labels[train], points[i], 5)
    assert result.y_pred.tolist() == predictions.tolist()


def test_leave_one_group_out_is_one_search(monkeypatch):
    """Leave-one-group-out searched each group apart, each search preparing (converting, scaling, centring)
    nearly every row again: 36 groups of 10^4 files (IDMT-ISA's sessions) took 3.3x leave-one-out's time. One
    search now leaves each query's group out; the votes are brute force's, ties (repeated rows, in other groups)
    in file order."""
    from echo.eval import neighbors

    points, labels = clustered(n_per_class=12, spread=2.0)
    points = np.round(points)  # repeated rows: ties across groups
    groups = np.repeat(np.arange(12), 3)
    prepared_banks = []
    preparer = neighbors._preparer
    monkeypatch.setattr(neighbors, "_preparer", lambda bank, *args: prepared_banks.append(len(bank))
                        or preparer(bank, *args))
    result = faults.evaluate(points, labels, "loocv", groups=[f"session {g}" for g in groups])
    expected = [naive_predict(points[groups != groups[i]], labels[groups != groups[i]], points[i], 5)
                for i in range(len(points))]
    assert result.y_pred.tolist() == expected
    assert prepared_banks == [len(points)]  # one bank, every row: not 12 of 33


def test_fused_leave_one_group_out_is_one_search_with_each_groups_own_votes(monkeypatch):
    """The fused view searched each group apart too. One search now leaves each query's group out of its means,
    stds and neighbours: the votes of the search per group, on a bank prepared once per channel."""
    from echo.eval import neighbors

    rng = seeded_rng()
    points, labels = clustered(n_per_class=12, dim=12, spread=2.0)
    embeddings = (points.reshape(len(points), 3, 4) * np.array([1.0, 10.0, 0.1])[None, :, None]).astype(np.float32)
    groups = np.array([f"session {g}" for g in rng.permutation(np.repeat(np.arange(9), 4))])
    classes, codes = faults.class_codes(labels)
    expected = np.empty_like(labels)
    for bank, queries, _ in faults.banks_and_queries("loocv", labels, 5, groups=groups):
        expected[queries] = classes[faults.predict(embeddings[bank], codes[bank], embeddings[queries], 5, fuse=True)]
    prepared_banks = []
    preparer = neighbors._preparer
    monkeypatch.setattr(neighbors, "_preparer", lambda bank, *args: prepared_banks.append(len(bank))
                        or preparer(bank, *args))
    result = faults.evaluate(embeddings, labels, "loocv", fuse=True, groups=groups)
    assert result.y_pred.tolist() == expected.tolist()
    assert prepared_banks == [len(points)] * 3  # one bank a channel, every row


def test_leave_one_out_searches_the_embeddings_not_copies(monkeypatch):
    """Leave-one-out took its bank and queries (every row, in order) and then their channels by fancy indexing:
    four copies of the embeddings for one search (MAFAULDA's 1951 x 7 x 7680 floats, 420 MB: 1.7 GB of the 5.1 GB
    the "all" view held). The search now sees the embeddings themselves where the channels are consecutive."""
    from echo.eval import neighbors

    points, labels = clustered(n_per_class=6, dim=12)
    embeddings = points.reshape(len(points), 3, 4).astype(np.float32)
    searched = []
    nearest = neighbors.nearest
    monkeypatch.setattr(neighbors, "nearest", lambda queries, bank, *args, **kwargs: searched.append((queries, bank))
                        or nearest(queries, bank, *args, **kwargs))
    for channels in (None, [1], [1, 2], [0, 2]):
        result = faults.evaluate(embeddings, labels, "loocv", channels=channels)
        chosen = embeddings[:, channels or [0, 1, 2]].reshape(len(points), -1)
        expected = [naive_predict(chosen, labels, chosen[i], 5, skip=i) for i in range(len(points))]
        assert result.y_pred.tolist() == expected
    assert [np.shares_memory(queries, embeddings) and np.shares_memory(bank, embeddings)
            for queries, bank in searched] == [True, True, True, False]  # [0, 2] is a copy of its own


def test_given_split_hand_case_and_metrics():
    # 1-D: class x near 0, class y near 10; k=3
    train = np.array([[0.0], [1.0], [2.0], [9.0], [10.0], [11.0]])
    test = np.array([[0.5], [4.0], [6.0], [10.5]])
    embeddings = np.concatenate([train, test])
    labels = np.array(["x", "x", "x", "y", "y", "y", "x", "y", "x", "y"])
    subsets = ["train"] * 6 + ["test"] * 4
    result = faults.evaluate(embeddings, labels, "split", k=3, subsets=subsets)
    # 0.5 -> x,x,x; 4.0 -> 2,1,0 -> x; 6.0 -> 2 (4), 9 (3): nearest three 9, 2, 10 -> y; 10.5 -> y
    assert result.y_pred.tolist() == ["x", "x", "y", "y"]
    assert result.accuracy == pytest.approx(0.5)
    # by hand: x predicted twice, right once (precision 1/2), recall 1/2; y the same; weights 2/4 each
    assert result.precision == pytest.approx(0.5) and result.recall == pytest.approx(0.5)
    assert result.f1 == pytest.approx(0.5)
    assert result.confusion.tolist() == [[1, 1], [1, 1]]


def test_weighted_metrics_by_hand():
    rng = seeded_rng()
    y_true = rng.choice(["a", "b", "c"], size=40)
    y_pred = rng.choice(["a", "b", "c"], size=40)
    result = faults.score(y_true, y_pred, ["a", "b", "c"], "loocv", "all")
    precision = recall = f1 = 0.0
    for c in "abc":
        tp = np.sum((y_pred == c) & (y_true == c))
        p = tp / max(np.sum(y_pred == c), 1)
        r = tp / max(np.sum(y_true == c), 1)
        weight = np.mean(y_true == c)
        precision, recall = precision + weight * p, recall + weight * r
        f1 += weight * (2 * p * r / (p + r) if p + r else 0)
    assert (result.precision, result.recall, result.f1) == pytest.approx((precision, recall, f1))
    assert result.confusion.sum() == 40 and np.trace(result.confusion) == np.sum(y_true == y_pred)


def test_multichannel_views():
    points, labels = clustered(n_per_class=6, dim=12)
    embeddings = points.reshape(len(points), 3, 4)
    single = faults.evaluate(embeddings, labels, "loocv", channels=[1])
    assert single.view == "channel 1"
    assert single.y_pred.tolist() == faults.evaluate(embeddings[:, 1], labels, "loocv").y_pred.tolist()
    concatenated = faults.evaluate(embeddings, labels, "loocv")
    assert concatenated.view == "all"
    assert concatenated.y_pred.tolist() == faults.evaluate(points, labels, "loocv").y_pred.tolist()
    fused = faults.evaluate(embeddings, labels, "loocv", channels=[0, 2], fuse=True)
    assert fused.view == "fused 0,2"
    expected = []
    for q in range(len(points)):
        keep = np.arange(len(points)) != q
        total = np.zeros(len(points))
        for c in (0, 2):
            row = np.linalg.norm(embeddings[:, c] - embeddings[q, c], axis=1)
            total += (row - row[keep].mean()) / row[keep].std()
        total[q] = np.inf
        expected.append(naive_vote(list(labels[np.argsort(total, kind="stable")[:5]])))
    assert fused.y_pred.tolist() == expected


def test_bad_protocol_inputs():
    points, labels = clustered()
    with pytest.raises(ValueError, match="unknown protocol"):
        faults.evaluate(points, labels, "bootstrap")
    with pytest.raises(ValueError, match="needs a train/test subset"):
        faults.evaluate(points, labels, "split")
    with pytest.raises(ValueError, match="17 labels for 18 embeddings"):
        faults.evaluate(points, labels[:-1], "loocv")
    with pytest.raises(ValueError, match="no embeddings to evaluate"):
        faults.evaluate(np.zeros((0, 3)), [], "loocv")
    with pytest.raises(ValueError, match=r"channels \[5\] must be a non-empty subset of 0..1"):
        faults.evaluate(np.stack([points, points], 1), labels, "loocv", channels=[5])
    with pytest.raises(ValueError, match=r"channels \[1, 1\] must be a non-empty subset of 0..1, each channel once"):
        faults.evaluate(np.stack([points, points], 1), labels, "loocv", channels=[1, 1], fuse=True)
    broken = points.copy()
    broken[4, 0] = np.nan  # made every neighbour -1 through the bank's centre: accuracy 0.5, no error
    with pytest.raises(ValueError, match=r"embeddings: row\(s\) 4 hold NaN or infinite values"):
        faults.evaluate(broken, labels, "loocv")


def test_leave_one_group_out_of_a_single_group_is_a_clear_error():
    """Every file in one group (IDMT-ISA files of one session) leaves an empty bank: it was reported as
    "no embeddings to evaluate", as if the data set were empty."""
    points, labels = clustered()
    with pytest.raises(ValueError, match="leave-one-group-out needs two groups or more, got 1"):
        faults.evaluate(points, labels, "loocv", groups=["session 1"] * len(labels))


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("folds, groups, why", [
    (20, None, "greater than the number of samples"),
    (7, None, "cannot be greater than the number of members in each class"),
    (5, ["s1"] * 6 + ["s2"] * 6 + ["s3"] * 6, "greater than the number of groups: 3"),
])
def test_more_folds_than_the_data_allows_is_named_with_the_class_counts(folds, groups, why):
    """scikit-learn's "n_splits=7 cannot be greater than the number of members in each class" named neither the
    folds option nor the data that has too few files."""
    points, labels = clustered()
    labels = np.r_[["a"] * 6, ["b"] * 6, ["c"] * 5, ["d"]]
    grouped = "" if groups is None else "; 3 groups"
    with pytest.raises(ValueError, match=f"{folds}-fold cross-validation of 18 files \\(per class: a 6, b 6, c 5, "
                                         f"d 1{grouped}\\) is impossible: .*{why}.* Choose fewer folds "
                                         "\\(--folds of `echo eval`\\), or leave-one-out \\(--protocol loocv\\)"):
        faults.evaluate(points, labels, "kfold", k=3, folds=folds, groups=groups)


def test_a_single_class_is_refused_not_scored_perfect():
    """Every file of one class (a MAFAULDA download of normal/ only) scored accuracy 1.0."""
    points, _ = clustered()
    for protocol in ("loocv", "kfold"):
        with pytest.raises(ValueError, match="needs two classes or more; every file is 'normal'"):
            faults.evaluate(points, ["normal"] * len(points), protocol)


def test_subsets_and_labels_of_the_wrong_shape_are_named():
    points, labels = clustered()
    with pytest.raises(ValueError, match="17 subsets for 18 embeddings"):  # was an IndexError of a boolean mask
        faults.evaluate(points, labels, "split", subsets=["train"] * 9 + ["test"] * 8)
    with pytest.raises(ValueError, match=r"labels must be one per embedding, a flat list; got shape \(18, 1\)"):
        faults.evaluate(points, labels[:, None], "loocv")  # a table's label column: failed in the vote


def test_a_k_above_a_protocols_smallest_bank_is_refused_before_any_search(monkeypatch):
    """It failed in the search, naming rows of a bank but not the protocol nor that k was the option to change;
    the smallest banks are counted here from the data: brute force of what each protocol leaves out."""
    from sklearn.model_selection import StratifiedGroupKFold

    monkeypatch.setattr(faults, "predict", lambda *args, **kwargs: pytest.fail("searched"))
    points, labels = clustered()
    groups = np.repeat(["g1", "g2", "g3", "g4", "g5", "g6"], [2, 4, 3, 3, 4, 2])  # each within one class
    subsets = np.where(np.arange(len(labels)) % 3 == 0, "test", "train")
    fold_trains = [len(train) for train, _ in StratifiedGroupKFold(3, shuffle=True, random_state=1).split(
        points, labels, groups)]
    for protocol, options, smallest, bank in [
        ("loocv", {}, len(labels) - 1, "every file but the query"),
        ("loocv", {"groups": groups}, len(labels) - max(Counter(groups).values()), "the files outside the largest group"),
        ("kfold", {"groups": groups, "folds": 3}, min(fold_trains), "the smallest training part of the 3 folds"),
        ("split", {"subsets": subsets}, np.sum(subsets == "train"), "the train files"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"k={smallest + 1} neighbours asked of the {protocol} "
                                                       f"protocol's bank of {smallest} files ({bank}): choose a "
                                                       f"smaller k")):
            faults.evaluate(points, labels, protocol, k=smallest + 1, **options)
        assert len(faults.banks_and_queries(protocol, labels, smallest, **options)) >= 1  # k = the bank is taken


def test_weighted_precision_of_a_class_never_predicted_is_zero():
    """A class that no file is predicted as has no precision: scikit-learn's zero_division decides it, and 1
    would credit the classifier with perfect precision for a class it never finds."""
    rng = seeded_rng()
    y_true = rng.choice(["a", "b", "c"], size=40)
    y_true[:3] = ["a", "b", "c"]
    y_pred = rng.choice(["a", "b"], size=40)  # never "c"
    result = faults.score(y_true, y_pred, ["a", "b", "c"], "loocv", "all")
    precision = f1 = 0.0
    for c in "ab":  # "c" adds weight * 0 to both
        tp = np.sum((y_pred == c) & (y_true == c))
        p, r = tp / np.sum(y_pred == c), tp / np.sum(y_true == c)
        precision += np.mean(y_true == c) * p
        f1 += np.mean(y_true == c) * (2 * p * r / (p + r) if p + r else 0)
    assert (result.precision, result.f1) == pytest.approx((precision, f1))


def test_every_channel_named_one_by_one_is_the_all_view():
    """channels=[0, 1, 2] of three channels is the same search as channels=None: both are "all" in the results
    table, not one "all" row and one "channels 0,1,2" row for the same numbers."""
    points, labels = clustered(n_per_class=6, dim=12)
    embeddings = points.reshape(len(points), 3, 4)
    named = faults.evaluate(embeddings, labels, "loocv", channels=[0, 1, 2])
    assert named.view == faults.evaluate(embeddings, labels, "loocv").view == "all"
    assert faults.evaluate(embeddings, labels, "loocv", channels=[0, 1]).view == "channels 0,1"


def test_embeddings_of_one_dimension_are_named():
    """A flat vector (one number per file) is neither (rows, features) nor (rows, channels, features): it failed
    as an IndexError when the channels were counted."""
    points, labels = clustered()
    for wrong in (points[:, 0], points[:, :, None, None]):
        with pytest.raises(ValueError, match=re.escape(f"got shape {wrong.shape}")):
            faults.evaluate(wrong, labels, "loocv")


def test_a_split_without_train_or_without_test_files_is_refused():
    """A split of only train files scored nothing and failed inside scikit-learn on empty arrays; one of only test
    files had no bank."""
    points, labels = clustered()
    n = len(labels)
    for subsets, train, test in ((["train"] * n, n, 0), (["test"] * n, 0, n)):
        with pytest.raises(ValueError, match=f"needs train and test files, got {train} train and {test} test"):
            faults.evaluate(points, labels, "split", subsets=subsets)


def test_only_kfold_reports_fold_accuracies():
    """Leave-one-out and a given split have no folds: a fold mean and std in their rows would be of one "fold",
    the whole data set, a std of 0 that measures nothing."""
    points, labels = clustered()
    subsets = np.where(seeded_rng().permutation(len(labels)) % 3 == 0, "test", "train")
    for protocol in ("loocv", "split"):
        result = faults.evaluate(points, labels, protocol, subsets=subsets)
        assert result.fold_accuracies == [] and "fold_mean" not in result.row() and "fold_std" not in result.row()
    assert len(faults.evaluate(points, labels, "kfold", k=3, folds=3).fold_accuracies) == 3


def test_the_kfold_searches_default_to_sirens_folds():
    """banks_and_queries is what `echo eval` checks the data against before encoding: without folds= or seed= it
    must give SIREN's 5 stratified folds shuffled with seed 1, as evaluate does."""
    points, labels = clustered(n_per_class=int(seeded_rng().integers(6, 12)))
    expected = StratifiedKFold(5, shuffle=True, random_state=1).split(points, labels)
    got = faults.banks_and_queries("kfold", labels)
    assert [(train.tolist(), test.tolist(), None) for train, test in expected] == \
        [(bank.tolist(), queries.tolist(), own) for bank, queries, own in got]


def test_labels_of_mixed_kinds_are_refused_naming_the_kinds():
    """A missing label (None) among names failed in numpy's sort: "'<' not supported between instances"."""
    with pytest.raises(ValueError, match="labels must be names or numbers of one kind, got NoneType, str"):
        faults.evaluate(np.eye(4), ["a", None, "b", "b"], "loocv", k=1)


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "seed must be a whole number from 0 to 2**32 - 1, got -1"),  # was "... Choose fewer folds"
    ({"seed": 2**32}, "seed must be a whole number from 0 to 2**32 - 1, got 4294967296"),
    ({"seed": "a"}, "seed must be a whole number from 0 to 2**32 - 1, got 'a'"),
    ({"folds": 1}, "folds must be a whole number, 2 or more, got 1"),  # was scikit-learn's n_splits=1
    ({"folds": 2.5}, "folds must be a whole number, 2 or more, got 2.5"),
    ({"k": "5"}, "k must be a whole number of neighbours, got '5'"),  # was a TypeError of '>' between str and int
])
def test_a_bad_k_folds_or_seed_is_named_as_itself(options, message):
    points, labels = clustered()
    with pytest.raises(ValueError, match=re.escape(message)):
        faults.evaluate(points, labels, "kfold", **options)


def test_whole_folds_and_seed_of_other_types_are_taken():
    points, labels = clustered()
    expected = faults.evaluate(points, labels, "kfold", folds=3, seed=2)
    result = faults.evaluate(points, labels, "kfold", folds=3.0, seed=np.int64(2))
    assert result.accuracy == expected.accuracy and result.fold_accuracies == expected.fold_accuracies


@pytest.mark.parametrize("channels, message", [
    (0, "channels must be a list of channel numbers, e.g. [0, 2], got 0"),  # was "'int' object is not iterable"
    ("0,1", "channels must be a list of channel numbers, e.g. [0, 2], got '0,1'"),
    ([0.5], "channels [0.5] must be a non-empty subset of 0..1, each channel once"),  # failed in numpy's indexing
    ([True], "channels [True] must be a non-empty subset of 0..1, each channel once"),  # was channel 1
])
def test_channels_that_are_no_list_of_channel_numbers_are_named(channels, message):
    points, labels = clustered()
    for fuse in (False, True):
        with pytest.raises(ValueError, match=re.escape(message)):
            faults.evaluate(np.stack([points, points], 1), labels, "loocv", channels=channels, fuse=fuse)


def test_channels_as_numpy_numbers_or_whole_floats_are_the_channels_themselves():
    points, labels = clustered()
    embeddings = np.stack([points, -points], 1)
    expected = faults.evaluate(embeddings, labels, "loocv", channels=[1])
    for channels in (np.array([1]), [1.0], (c for c in [1])):
        result = faults.evaluate(embeddings, labels, "loocv", channels=channels)
        assert result.view == expected.view == "channel 1" and result.accuracy == expected.accuracy


def test_an_unknown_device_is_named_as_echo_load_and_fast_encode_name_it():
    """It was torch's RuntimeError listing every device type torch was built with."""
    from echo.eval import neighbors

    points, labels = clustered()
    embeddings = np.stack([points, points], 1)
    for search in (lambda: faults.evaluate(points, labels, "loocv", device="gpu"),
                   lambda: faults.evaluate(embeddings, labels, "kfold", fuse=True, device="gpu"),
                   lambda: neighbors.nearest(points, points, device="gpu"),
                   lambda: neighbors.fused_nearest(embeddings, embeddings, 1, device="gpu")):
        with pytest.raises(ValueError, match=re.escape("unknown device 'gpu'; e.g. cpu, cuda, cuda:1")):
            search()
