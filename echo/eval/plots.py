"""PNG figures of an evaluation (matplotlib, no display needed): ROC curves and score histograms per machine,
confusion matrices, and a 2-D PCA projection of the embeddings coloured by label."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import atomic
from . import require

# A class's colour in every figure: the histogram's default cycle drew normal blue and anomalous orange, the
# projection's sorted labels the other way round. The demo's healthy clips are its normal ones.
CLASS_COLOURS = {"normal": "C0", "healthy": "C0", "anomalous": "C1", "unlabelled": "C2"}
CYCLE = tuple(f"C{i}" for i in range(10))
LABEL_INCHES_PER_CHARACTER = 0.065  # the width of a character of an 8-point tick label, with room to spare
LEGEND_INCHES_PER_CHARACTER = 0.055  # and of a 7-point legend entry
LEGEND_ROWS = 24  # the 7-point entries a 5-inch projection holds in one column
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def new_figure(*grid, **options):
    """(figure, axes) as `pyplot.subplots(*grid, **options)` gives them, but a Figure of its own, outside pyplot:
    no backend is chosen (a user's interactive one stays) and nothing is kept open after it is saved."""
    require("matplotlib", "drawing plots")
    from matplotlib.figure import Figure

    subplot_options = {key: options.pop(key) for key in ("sharex", "sharey", "gridspec_kw") if key in options}
    figure = Figure(**options)
    return figure, figure.subplots(*grid, **subplot_options)


def save(figure, path: Path) -> Path:
    """Write a figure whole or not at all: an interrupt mid-write leaves no half PNG over an earlier one."""
    path = Path(path)
    figure.tight_layout()
    with atomic.replacing(path) as temporary:  # its name ends in .tmp: the format comes from `path`
        figure.savefig(temporary, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _plain(name) -> str:
    """A folder's or class's name drawn as it is spelt: matplotlib reads text between two "$" as TeX, which drew
    a class $x_1^2$ as x with indices and stopped the evaluation, its plots unwritten, at one named a$$b."""
    return str(name).replace("$", r"\$")


def anomaly_plots(clips, scores, out: Path, dcase: bool = True) -> list[Path]:
    """One ROC figure (a curve per section with both labels; none where no section has them) and one score
    histogram per (split, machine). Without `dcase` (one's own folder: no split or section) a figure is named
    after the machine alone."""
    metrics = require("sklearn.metrics", "drawing ROC curves")
    groups = defaultdict(list)
    for index, clip in enumerate(clips):
        if clip.subset == "test":
            groups[(clip.split, clip.machine)].append(index)
    written = []
    for (split, machine), members in sorted(groups.items()):
        figure, axis = new_figure(figsize=(5, 5))
        sections = sorted({clips[i].section for i in members})
        for section in sections:
            chosen = [i for i in members if clips[i].section == section and clips[i].label is not None]
            labels = np.array([clips[i].label for i in chosen])
            if len(set(labels)) == 2:
                fpr, tpr, _ = metrics.roc_curve(labels, scores[chosen])
                # a DCASE section's id, or the demo's section names; one's own folder has one section, unnamed
                name = "" if not dcase else f"section {section}" if str(section).isdigit() else section
                # one curve over the section's clips: with domains, an AUC results.csv does not list
                scope = "AUC of all domains" if any(clips[i].domain for i in chosen) else "AUC"
                auc = f"{scope} {metrics.roc_auc_score(labels, scores[chosen]):.3f}"
                axis.plot(fpr, tpr, label=f"{_plain(name)} ({auc})" if name else auc)
        title = _plain(f"{machine} ({split})" if dcase else machine)
        stem = f"{_safe(split)}_{_safe(machine)}" if dcase else _safe(machine)
        if axis.get_legend_handles_labels()[0]:
            axis.plot([0, 1], [0, 1], "k:", linewidth=1)
            axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
            axis.legend(fontsize=8)
            written.append(save(figure, out / f"roc_{stem}.png"))
        figure, axis = new_figure(figsize=(6, 4))
        # one set of bins for every class: bins of each class's own range draw a tight class as slivers
        edges, logarithmic = _score_bins(scores[members])
        for name, label in (("normal", 0), ("anomalous", 1), ("unlabelled", None)):
            values = [scores[i] for i in members if clips[i].label == label]
            if values:
                axis.hist(values, bins=edges, alpha=0.6, color=CLASS_COLOURS[name], label=f"{name} ({len(values)})")
        axis.set(xlabel="anomaly score (cosine distance to the nearest normal clip)", ylabel="clips", title=title)
        # counts are whole; small scores (3e-4) read 0.000296 per tick, labels run into each other: 2.96 x 1e-4
        axis.yaxis.get_major_locator().set_params(integer=True)
        if logarithmic:
            axis.set_xscale("log")
        else:
            axis.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        axis.legend(fontsize=8)
        written.append(save(figure, out / f"scores_{stem}.png"))
    return written


def _score_bins(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """30 bin edges over `scores`, and whether they are spaced on a log axis. Scores over two decades or more
    are: the demo's pump (healthy 5e-6 to 1.3e-5, faults 4e-5 to 1.4e-3, AUC 1) drew every healthy clip and two
    faults in one linear first bar. (Two decades hold two labelled powers of ten; over about one, matplotlib
    labels 2, 3, 4 x 10^-5 ... into each other.) One score repeated gets bins around it: numpy's +-0.5 drew
    3e-4 at 0."""
    low, high = float(np.min(scores)), float(np.max(scores))
    if low > 0 and high >= 100 * low:
        return np.geomspace(low, high, 31), True
    spread = sorted((low * 0.95, low * 1.05)) if low == high != 0 else None
    return np.histogram_bin_edges(scores, bins=30, range=spread), False


def confusion_plot(result, path: Path) -> Path:
    """Counts of files per (true, predicted) class. The figure grows with the class names: a fixed size left three
    30-character names a thumbnail matrix and cut the title off."""
    names = [str(c) for c in result.classes]
    size = max(4, 0.6 * len(names) + 1.5 + LABEL_INCHES_PER_CHARACTER * max(map(len, names)))
    names = [_plain(name) for name in names]
    figure, axis = new_figure(figsize=(size, size))
    image = axis.imshow(result.confusion, cmap="Blues")
    ticks = range(len(names))
    axis.set_xticks(ticks, names, rotation=90, fontsize=8)
    axis.set_yticks(ticks, names, fontsize=8)
    for (row, column), count in np.ndenumerate(result.confusion):
        # black on the dark cells (the diagonal of a good classifier) could not be read: white there
        axis.text(column, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if image.norm(count) > 0.5 else "black")
    axis.set(xlabel="predicted", ylabel="true",
             title=f"{result.protocol}, {result.view}: accuracy {result.accuracy:.3f}")
    return save(figure, path)


def projection_plot(vectors: np.ndarray, labels, path: Path, title: str) -> Path:
    """First two principal components, one colour (and past the cycle's colours, marker) per label. The legend
    is beside the points, not over them: inside, the 15 labels of a bearing data set hid a third of the points."""
    decomposition = require("sklearn.decomposition", "the 2-D projection")
    vectors = np.asarray(vectors, dtype=np.float64)
    points = decomposition.PCA(n_components=2).fit_transform(vectors) if len(vectors) > 2 else \
        np.zeros((len(vectors), 2))
    labels = np.asarray([str(label) for label in labels])
    styles = _styles(set(labels))
    entries = [f"{_plain(label)} ({(labels == label).sum()})" for label in sorted(styles)]
    columns = -(-len(entries) // LEGEND_ROWS)
    legend_inches = columns * (0.4 + LEGEND_INCHES_PER_CHARACTER * max(map(len, entries), default=0))
    figure, axis = new_figure(figsize=(6 + legend_inches, 5))
    handles = []
    for label, entry in zip(sorted(styles), entries):
        colour, marker = styles[label]
        chosen = labels == label
        handles.append(axis.scatter(points[chosen, 0], points[chosen, 1], s=8, color=colour, marker=marker,
                                    label=entry))
    axis.set(xlabel="PC 1", ylabel="PC 2", title=_plain(title))
    # matplotlib leaves out entries that start with "_" (a class _noise): artists' labels, and before 3.10 the labels
    # given too, so each entry is given with a space before it and then set as it is
    legend = axis.legend(handles, [f" {entry}" for entry in entries], fontsize=7, markerscale=2, ncols=columns,
                         loc="upper left", bbox_to_anchor=(1.01, 1))
    for text, entry in zip(legend.get_texts(), entries):
        text.set_text(entry)
    return save(figure, path)


def _styles(labels: set) -> dict:
    """label -> (colour, marker): CLASS_COLOURS' own, and the other labels (fault classes) the colours of the
    cycle those leave, in sorted order, with the next marker each time the colours run out: 15 classes drew
    five pairs in one colour."""
    fixed = {label: (CLASS_COLOURS[label], MARKERS[0]) for label in labels if label in CLASS_COLOURS}
    free = [colour for colour in CYCLE if colour not in {colour for colour, _ in fixed.values()}]
    return {**fixed, **{label: (free[i % len(free)], MARKERS[i // len(free) % len(MARKERS)])
                        for i, label in enumerate(sorted(labels - set(fixed)))}}
