"""DCASE scoring, grouping and aggregation against hand computations on small tables."""
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from echo.eval import anomaly
from echo.eval.anomaly import Clip

from conftest import seeded_rng


def pairwise_auc(labels, scores):
    """P(anomaly scores above normal), ties counting one half."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    a, n = scores[labels == 1], scores[labels == 0]
    return np.mean((a[:, None] > n[None, :]) + 0.5 * (a[:, None] == n[None, :]))


def mcclish_pauc(labels, scores, max_fpr=0.1):
    """Standardised partial AUC, from the ROC polygon (thresholds at every distinct score)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    fpr, tpr = [0.0], [0.0]
    for threshold in sorted(set(scores), reverse=True):
        fpr.append(np.mean(scores[labels == 0] >= threshold))
        tpr.append(np.mean(scores[labels == 1] >= threshold))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fpr, tpr), zip(fpr[1:], tpr[1:])):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the segment at max_fpr
            y1, x1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0), max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    low, high = max_fpr ** 2 / 2, max_fpr
    return 0.5 * (1 + (area - low) / (high - low))


def test_six_point_auc_and_pauc_by_hand():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.3, 0.9]
    # pairs (anomaly > normal): 0.8 beats 3, 0.3 beats 1, 0.9 beats 3 -> 7 of 9
    rows, _ = anomaly.group_metrics([Clip(Path(f"{i}"), "dev", "fan", "00", None, "test", y)
                                     for i, y in enumerate(labels)], scores, 2020)
    values = {row["metric"]: row["value"] for row in rows}
    assert values["AUC"] == pytest.approx(7 / 9)
    # ROC: (0, 2/3) after the two top anomalies, flat until fpr 1/3: raw area over [0, 0.1] = 0.1 * 2/3
    assert values["pAUC"] == pytest.approx(0.5 * (1 + (0.1 * 2 / 3 - 0.005) / (0.1 - 0.005)))


def test_metrics_agree_with_independent_formulas_on_random_scores():
    rng = seeded_rng()
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    scores = np.round(rng.normal(size=65) + labels, 1)  # rounded: ties occur
    clips = [Clip(Path(str(i)), "dev", "m", "00", None, "test", int(y)) for i, y in enumerate(labels)]
    rows, _ = anomaly.group_metrics(clips, scores, 2020)
    values = {row["metric"]: row["value"] for row in rows}
    assert values["AUC"] == pytest.approx(pairwise_auc(labels, scores))
    assert values["AUC"] == pytest.approx(roc_auc_score(labels, scores))
    assert values["pAUC"] == pytest.approx(mcclish_pauc(labels, scores))


def make_table():
    """dev fan section 00: source 2 normal + 2 anomalous, target 2 normal + 1 anomalous, with chosen scores."""
    spec = [  # (domain, label, score)
        ("source", 0, 0.1), ("source", 0, 0.5), ("source", 1, 0.4), ("source", 1, 0.9),
        ("target", 0, 0.3), ("target", 0, 0.7), ("target", 1, 0.6),
    ]
    clips = [Clip(Path(f"c{i}"), "dev", "fan", "00", d, "test", y) for i, (d, y, _) in enumerate(spec)]
    return clips, np.array([s for _, _, s in spec]), spec


def by_group(rows):
    return {(row["domain"], row["metric"]): row["value"] for row in rows}


def test_2021_groups_are_per_domain_test_sets():
    clips, scores, spec = make_table()
    values = by_group(anomaly.group_metrics(clips, scores, 2021)[0])
    # source: anomalies 0.4, 0.9 vs normals 0.1, 0.5: 0.4>0.1, 0.9>both -> 3/4
    assert values[("source", "AUC")] == pytest.approx(3 / 4)
    # target: anomaly 0.6 vs 0.3, 0.7 -> 1/2
    assert values[("target", "AUC")] == pytest.approx(1 / 2)
    assert set(values) == {("source", "AUC"), ("source", "pAUC"), ("target", "AUC"), ("target", "pAUC")}


@pytest.mark.parametrize("year", [2022, 2023, 2024, 2025])
def test_2022_on_domain_rules_and_pauc_over_both_domains(year):
    clips, scores, spec = make_table()
    official = by_group(anomaly.group_metrics(clips, scores, year, "official")[0])
    siren = by_group(anomaly.group_metrics(clips, scores, year, "siren")[0])
    # official source AUC: normals 0.1, 0.5 (source) vs anomalies 0.4, 0.9, 0.6 (both domains): 0.4>0.1,
    # 0.9>both, 0.6>both -> 5/6; target: normals 0.3, 0.7 vs 0.4, 0.9, 0.6: 0.4>0.3, 0.9>both, 0.6>0.3 -> 4/6
    assert official[("source", "AUC")] == pytest.approx(5 / 6)
    assert official[("target", "AUC")] == pytest.approx(4 / 6)
    assert siren[("source", "AUC")] == pytest.approx(3 / 4)
    assert siren[("target", "AUC")] == pytest.approx(1 / 2)
    labels = [y for _, y, _ in spec]
    assert official[("both", "pAUC")] == pytest.approx(mcclish_pauc(labels, scores))
    assert set(official) == {("source", "AUC"), ("target", "AUC"), ("both", "pAUC")}


def test_one_class_group_is_reported_and_excluded():
    clips, scores, _ = make_table()
    clips = [c for c in clips if not (c.domain == "target" and c.label == 1)]
    scores = scores[:6]
    rows, excluded = anomaly.group_metrics(clips, scores, 2021)
    assert ("target", "AUC") not in by_group(rows)
    assert excluded == [{"split": "dev", "machine": "fan", "section": "00", "domain": "target",
                         "metrics": "AUC+pAUC", "normals": 2, "anomalies": 0, "reason": "one class only"}]


def test_aggregation_by_hand():
    rows = [{"split": "dev", "metric": "AUC", "value": 0.5}, {"split": "dev", "metric": "pAUC", "value": 1.0},
            {"split": "eval", "metric": "AUC", "value": 0.8}, {"split": "eval", "metric": "pAUC", "value": 0.0}]
    summary = anomaly.summarise(rows, 2023, eps=1e-3)
    assert summary["official score (dev)"] == pytest.approx(2 / (1 / 0.5 + 1 / 1.0))
    assert summary["official score (eval)"] == pytest.approx(2 / (1 / 0.8 + 1 / 1e-3))  # 0 floored at eps
    assert summary["yearly figure (dev+eval)"] == pytest.approx(4 / (2 + 1 + 1.25 + 1000))
    assert summary["AUC (dev)"] == pytest.approx(0.5)
    summary_2020 = anomaly.summarise(rows, 2020)
    assert summary_2020["official score (dev)"] == pytest.approx(0.75)
    assert summary_2020["yearly figure (dev+eval)"] == pytest.approx((0.5 + 1.0 + 0.8 + 0.0) / 4)


def test_bank_is_per_split_machine_section_and_cosine():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0], [1.0, 0.2], [1.0, 1.0]])
    clips = [
        Clip(Path("a"), "dev", "fan", "00", "source", "train", 0),
        Clip(Path("b"), "dev", "fan", "00", "target", "train", 0),
        Clip(Path("c"), "eval", "fan", "00", "source", "train", 0),  # another split: never in dev's bank
        Clip(Path("d"), "dev", "fan", "00", None, "test", 1),
        Clip(Path("e"), "dev", "fan", "00", None, "test", 0),
        Clip(Path("f"), "eval", "fan", "00", None, "test", None),
    ]
    scores = anomaly.score_clips(clips, e)
    assert np.isnan(scores[:3]).all()
    # d = [1, 1]: 45 degrees from both dev bank clips; e = [1, 0.2]: nearest is [1, 0]
    assert scores[3] == pytest.approx(1 - 1 / np.sqrt(2))
    assert scores[4] == pytest.approx(1 - 1 / np.sqrt(1.04))
    assert scores[5] == pytest.approx(0.0, abs=1e-12)  # eval bank [5, 5] is parallel to [1, 1]


def test_close_embeddings_are_scored_to_float64_precision():
    """float32 embeddings 0.5 % apart: 1 - cos is ~1e-5, which float32 arithmetic holds to 2-3 digits."""
    rng = seeded_rng()
    centre = rng.standard_normal(3000)
    e = (centre + 0.005 * rng.standard_normal((12, 3000)) * np.linalg.norm(centre) / np.sqrt(3000)).astype(np.float32)
    clips = [Clip(Path(f"{i}"), "dev", "fan", "00", None, "train" if i < 8 else "test", 0) for i in range(12)]
    scores = anomaly.score_clips(clips, e)
    unit = e.astype(np.float64) / np.linalg.norm(e.astype(np.float64), axis=1, keepdims=True)
    expected = (1 - unit[8:] @ unit[:8].T).min(1)
    assert np.abs(scores[8:] - expected).max() / expected.max() < 1e-9


def test_embeddings_that_cannot_be_scored_are_named():
    clips = [Clip(Path(f"{i}"), "dev", "fan", "00", None, "train" if i < 2 else "test", 0) for i in range(4)]
    with pytest.raises(ValueError, match=r"embeddings differ in shape \(\(4,\), \(5,\)\)"):
        anomaly.score_clips(clips, [np.ones(4), np.ones(4), np.ones(5), np.ones(5)])
    e = np.ones((4, 3))
    e[3, 2] = np.inf  # was scored inf, the most anomalous clip, then failed in scikit-learn
    with pytest.raises(ValueError, match=r"embeddings: row\(s\) 3 hold NaN or infinite values"):
        anomaly.score_clips(clips, e)


def test_zero_embeddings_are_named_by_their_row():
    """Cosine distance is undefined for a zero embedding; the search names rows of one group's bank or test
    clips, not of the embeddings given."""
    clips = [Clip(Path(f"{i}"), "dev", m, "00", None, s, 0)
             for i, (m, s) in enumerate([("fan", "train"), ("fan", "test"), ("pump", "train"), ("pump", "test")])]
    e = seeded_rng().normal(size=(4, 3))
    e[3] = 0
    with pytest.raises(ValueError, match=r"embeddings: row\(s\) 3 have length 0"):
        anomaly.score_clips(clips, e)


def test_test_clips_without_a_bank_are_an_error():
    clips = [Clip(Path("a"), "dev", "fan", "00", None, "train", 0), Clip(Path("b"), "dev", "fan", "01", None, "test", 0)]
    with pytest.raises(ValueError, match="dev fan section 01: 1 test clip but no training clip"):
        anomaly.score_clips(clips, np.eye(2))
    with pytest.raises(ValueError, match="DCASE year 2019"):
        anomaly.group_metrics(clips, [0, 0], 2019)
    with pytest.raises(ValueError, match="unknown domain AUC rule"):
        anomaly.group_metrics(clips, [0, 0], 2023, "strict")



def test_a_subset_neither_train_nor_test_is_refused():
    """A clip of subset "Test" joined the bank: the test clip most like it scored 0 against it, and it was left
    out of every group unseen."""
    clips = [Clip(Path(name), "dev", "fan", "00", None, subset, label)
             for name, subset, label in (("a", "train", 0), ("b", "test", 0), ("c", "Test", 1))]
    with pytest.raises(ValueError, match="c: subset 'Test' is neither 'train' \\(memory bank\\) nor 'test'"):
        anomaly.score_clips(clips, np.eye(3))


@pytest.mark.parametrize("field, value", [("label", "1"), ("label", 2), ("domain", "Source"), ("domain", None)])
def test_labels_and_domains_the_groups_cannot_read_are_refused(field, value):
    """A label "0"/"1" read from a csv as text equals neither 0 nor 1, and a domain spelt otherwise matches neither
    source nor target: the clip fell out of every count, and its group was excluded as "one class only" or its
    domain AUC measured without it."""
    clips, scores, _ = make_table()
    clips[2] = Clip(**{**vars(clips[2]), field: value})
    with pytest.raises(ValueError, match=f"c2: {field} {value!r}"):
        anomaly.group_metrics(clips, scores, 2023)


def test_labels_of_other_number_types_are_read():
    clips, scores, _ = make_table()
    retyped = [Clip(**{**vars(c), "label": kind(c.label)})
               for c, kind in zip(clips, [np.int64, bool, float, np.int8, int, np.float32, np.int64])]
    values = by_group(anomaly.group_metrics(retyped, scores, 2023)[0])
    assert values[("source", "AUC")] == pytest.approx(5 / 6)  # as in test_2022_on_domain_rules_...
    assert values[("target", "AUC")] == pytest.approx(4 / 6)


def test_a_year_given_as_text_is_named_as_text():
    """"DCASE year 2023 is not supported; supported: 2020-2025" said of the string "2023" contradicted itself."""
    clips, scores, _ = make_table()
    with pytest.raises(ValueError, match="DCASE year '2023' is not supported"):
        anomaly.group_metrics(clips, scores, "2023")


def test_scores_that_do_not_pair_with_the_clips_are_refused():
    """One score too many paired each clip with its neighbour's score and measured that; one too few failed
    with an IndexError deep in the groups."""
    clips, scores, _ = make_table()
    scores = np.asarray(scores, dtype=np.float64)
    for wrong in (np.r_[0.5, scores], scores[:-1]):
        with pytest.raises(ValueError, match=f"{len(wrong)} scores for {len(clips)} clips"):
            anomaly.group_metrics(clips, wrong, 2023)


def test_a_test_clip_without_a_finite_score_is_named():
    """scikit-learn's "Input contains NaN" named no clip."""
    clips, scores, _ = make_table()
    scores = np.array(scores, dtype=np.float64)
    scores[2] = np.nan
    with pytest.raises(ValueError, match="c2: score nan is not a finite number"):
        anomaly.group_metrics(clips, scores, 2023)


def test_a_users_folder_is_scored_as_2020_arithmetic_means_and_no_domains():
    """year=None (a user's folder): AUC and pAUC per (machine, section), no domains, arithmetic means (not the
    eps-floored harmonic ones of 2021-2025)."""
    rng = seeded_rng()
    labels = np.r_[np.zeros(12, int), np.ones(9, int)]
    scores = rng.normal(size=len(labels)) + labels
    clips = [Clip(Path(str(i)), "dev", "pump", "00", None, "test", int(y)) for i, y in enumerate(labels)]
    rows, excluded = anomaly.group_metrics(clips, scores, None)
    values = {row["metric"]: row["value"] for row in rows}
    assert not excluded and {row["domain"] for row in rows} == {""} and set(values) == {"AUC", "pAUC"}
    assert values["AUC"] == pytest.approx(pairwise_auc(labels, scores))
    assert values["pAUC"] == pytest.approx(mcclish_pauc(labels, scores))
    hand = [{"split": "dev", "metric": "AUC", "value": 0.5}, {"split": "dev", "metric": "pAUC", "value": 0.0},
            {"split": "eval", "metric": "AUC", "value": 0.9}, {"split": "eval", "metric": "pAUC", "value": 0.7}]
    summary = anomaly.summarise(hand, None)
    assert summary["official score (dev)"] == pytest.approx(0.25)  # arithmetic: the harmonic mean is ~2 eps
    assert summary["official score (eval)"] == pytest.approx(0.8)
    assert summary["yearly figure (dev+eval)"] == pytest.approx((0.5 + 0.0 + 0.9 + 0.7) / 4)
    assert anomaly.mean_score([0.2, 0.6], None) == pytest.approx(0.4)


def test_fewer_embeddings_than_clips_are_refused_by_count():
    """Only more embeddings than clips were refused: one too few failed as numpy's IndexError deep in a bank (or
    was not noticed where the missing rows were the last training clips of a group)."""
    rng = seeded_rng()
    n = int(rng.integers(4, 9))
    clips = [Clip(Path(f"{i}"), "dev", "fan", "00", None, "train" if i < n - 2 else "test", 0) for i in range(n)]
    e = rng.normal(size=(n, 3))
    for wrong in (e[:-1], e[:1]):
        with pytest.raises(ValueError, match=f"^{len(wrong)} embeddings for {n} clips$"):
            anomaly.score_clips(clips, wrong)


def test_unlabelled_test_clips_are_left_out_of_the_groups():
    """Eval clips of DCASE's evaluation sets come without labels (None): they are scored but not measured; taken
    as labelled, they were refused as "label None is neither 0 nor 1"."""
    clips, scores, _ = make_table()
    rng = seeded_rng()
    unlabelled = [Clip(Path(f"u{i}"), "dev", "fan", "00", domain, "test", None)
                  for i, domain in enumerate(rng.choice(["source", "target"], size=3))]
    rows, excluded = anomaly.group_metrics(clips + unlabelled, np.r_[scores, rng.normal(size=3)], 2023)
    assert (rows, excluded) == anomaly.group_metrics(clips, scores, 2023)


def test_an_infinite_score_is_named_as_nan_is():
    """Only NaN was checked: an infinite score reached scikit-learn, whose "Input contains infinity" names no
    clip."""
    clips, scores, _ = make_table()
    for value in (np.inf, -np.inf):
        wrong = np.array(scores, dtype=np.float64)
        wrong[4] = value
        with pytest.raises(ValueError, match=f"c4: score {value} is not a finite number"):
            anomaly.group_metrics(clips, wrong, 2023)


def test_a_2021_domain_the_groups_cannot_read_is_refused():
    """2021 measures each domain on its own test clips, so a domain spelt otherwise ("Source") dropped the clip
    from both, unseen, as in 2022-2025."""
    clips, scores, _ = make_table()
    clips[int(seeded_rng().integers(len(clips)))] = Clip(**{**vars(clips[0]), "domain": "Source"})
    with pytest.raises(ValueError, match="domain 'Source' is neither 'source' nor 'target' \\(DCASE 2021\\)"):
        anomaly.group_metrics(clips, scores, 2021)


def test_one_split_has_no_yearly_figure_and_no_values_no_score():
    """The yearly figure pools dev and eval: of one split it would repeat that split's official score as if it
    were the paper's figure. An empty list of values has no mean: NaN, never a score of 0."""
    rng = seeded_rng()
    rows = [{"split": "dev", "metric": metric, "value": float(rng.uniform(0.3, 1))} for metric in ("AUC", "pAUC")]
    for year in (2020, 2023, None):
        summary = anomaly.summarise(rows, year)
        assert set(summary) == {"official score (dev)", "AUC (dev)", "pAUC (dev)"}
        assert np.isnan(anomaly.mean_score([], year))


def test_the_default_floor_is_the_official_evaluators_machine_epsilon():
    """The DCASE evaluators take the harmonic mean of values floored at sys.float_info.epsilon: a larger default
    floor turned a group scored 0 into a yearly score thousands of times too high."""
    import sys

    rng = seeded_rng()
    values = np.r_[0.0, rng.uniform(0.2, 1.0, size=int(rng.integers(2, 6)))]
    floored = np.maximum(values, sys.float_info.epsilon)
    for year in (2021, 2023):
        assert anomaly.mean_score(values, year) == pytest.approx(len(values) / np.sum(1 / floored), rel=1e-12)


@pytest.mark.parametrize("eps", [0, -1.0, float("nan"), 1.5, "1e-3", True])
def test_a_floor_outside_0_to_1_is_refused(eps):
    """NaN gave NaN scores, 1.5 scored every group 1.5 and a text failed in numpy's maximum."""
    rows = [{"split": "dev", "metric": "AUC", "value": float(seeded_rng().uniform(0.3, 1))}]
    for call in (lambda: anomaly.mean_score([row["value"] for row in rows], 2023, eps),
                 lambda: anomaly.summarise(rows, 2023, eps)):
        with pytest.raises(ValueError, match=re.escape(f"eps, the harmonic means' floor, must be a number in (0, 1), "
                                                       f"got {eps!r}")):
            call()
