"""`python -m echo eval --task TASK --data DIR --model PATH --out DIR`: embed a data set (cached), score it
with the SIREN protocol, print and save the results (results.csv, results.json, failures.csv; scores.csv for
anomaly detection) and the plots (PNG) in --out, with files/s and the share of time spent encoding vs searching."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import atomic, windows
from ..cli import WorkKept
from ..geometry import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, n_bands
from ..wording import counted
from . import anomaly, datasets, faults, neighbors, plots, require
from .embed import BATCH_FILES, READ_WORKERS, audio_header, batch_files_help, embed_files, shown

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# fault classification's options, None on the command line until _check_options knows the task takes them
FAULT_DEFAULTS = {"k": 5, "folds": 5, "seed": 1}
# what names an anomaly-detection group of a DCASE data set; one's own folder (--task folder) has none of it
DCASE_GROUP = ("split", "machine", "section", "domain")


def add_arguments(parser) -> None:
    parser.add_argument("--task", required=True, choices=datasets.TASKS)
    parser.add_argument("--data", required=True, type=Path,
                        help="the data set's folder; for --task folder (anomaly detection): DATA/normal/* (the "
                        "normal bank) and DATA/test/normal/*, DATA/test/anomalous/* or DATA/test/* (unlabelled); "
                        "for --task classes (fault classification): DATA/<class>/*, or DATA/train/<class>/* and "
                        "DATA/test/<class>/*; files of one sample rate (band count) and channel count")
    parser.add_argument("--model", default="default",
                        help="checkpoint path (.safetensors or .pth) or name: default, echo-small, echo-tiny "
                        "(default: %(default)s, the bundled model)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results and plots")
    parser.add_argument("--cache", type=Path, help="embedding cache folder (default: OUT/cache)")
    parser.add_argument("--device", default=None, help="encode and search device (default: cuda if present)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="encoder compute dtype (bfloat16: 2-6x faster end to end on CPUs with AVX-512 BF16 "
                        "or AMX, relative error ~5e-3)")
    parser.add_argument("--labels", type=Path, action="append", help="DCASE eval_data_list csv (default: found "
                        "under --data)")
    parser.add_argument("--domain-auc", choices=anomaly.DOMAIN_RULES,
                        help="2022-2025 domain AUC: official (normals of the domain + all anomalies) or siren "
                        "(the domain's clips only) (default: official)")
    parser.add_argument("--eps", type=float, default=anomaly.HMEAN_EPS, help="floor of values in harmonic means (default: %(default)g)")
    parser.add_argument("--protocol", action="append", choices=faults.PROTOCOLS,
                        help="fault protocols (default: those the data set defines)")
    parser.add_argument("--k", type=int, help=f"neighbours for fault classification (default: {FAULT_DEFAULTS['k']})")
    parser.add_argument("--folds", type=int, help=f"folds of the k-fold protocol (default: {FAULT_DEFAULTS['folds']})")
    parser.add_argument("--seed", type=int, help=f"k-fold shuffle seed (default: {FAULT_DEFAULTS['seed']})")
    parser.add_argument("--channels", help="channels fused for multi-channel data, e.g. 0,1,2 (default: all)")
    parser.add_argument("--search", choices=("torch", "faiss"), help="anomaly search backend (default: torch)")
    parser.add_argument("--window", type=float, metavar="SECONDS",
                        help="--task folder, long recordings: score each file window by window, each span of SECONDS "
                        "a clip of its own labelled as its file, one every --hop seconds, against a bank of every "
                        "normal window (scores.csv names a window FILE#t=START,END); the tail shorter than a window "
                        "is left out, a file shorter than one fails")
    parser.add_argument("--hop", type=float, metavar="SECONDS",
                        help="seconds between windows' starts (default: --window, windows end to end)")
    parser.add_argument("--batch-files", type=int, default=BATCH_FILES, help=batch_files_help(BATCH_FILES))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def format_table(rows: list, columns: list) -> str:
    cell = lambda value: f"{value:.4f}" if isinstance(value, float) else str(value)  # noqa: E731
    widths = [max([len(c)] + [len(cell(row.get(c, ""))) for row in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for row in rows]
    return "\n".join(lines)


def _json_values(value):
    """NaN and infinities (a figure that could not be measured) as null: JSON has no NaN, and strict readers
    refuse the bare NaN Python's json writes."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_values(item) for item in value]
    return value


def _check_headers(dataset, windowed: bool) -> None:
    """What the files' headers tell before the encoding: files whose embeddings would differ in size (another
    rate's band count, another channel count) are refused (`_stack` found them once every file was encoded), and
    test clips of lengths far from the bank's are noted (not where `windowed`: every clip is a window, of one
    length), and fault data's channel count is kept for its per-channel views. Files whose header cannot be read
    are left to the reading, which reports them."""
    if dataset.read is not datasets.read_audio:  # the .mat and .csv data sets have one rate and channel count
        return
    soundfile = require("soundfile", "reading audio files")
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        headers = list(pool.map(partial(audio_header, soundfile), [item.path for item in dataset.items]))
    usable = [(item, header) for item, header in zip(dataset.items, headers)
              if header is not None and MIN_SAMPLE_RATE <= header.samplerate <= MAX_SAMPLE_RATE]
    _refuse_other_sizes(usable)
    if dataset.kind == "anomaly":
        if not windowed:
            _note_other_lengths(dataset, usable)
    elif usable:  # one channel count now: each channel of a 3-axis sensor's files is viewed alone and fused
        dataset.channels = usable[0][1].channels


def _refuse_other_sizes(usable: list) -> None:
    # (bands, channels) -> {(rate, channels): (files, first path)}; not keyed by their product, the embedding's
    # size: 48 kHz stereo (2 x 19 bands) and 96 kHz mono (38) were compared, band against other channel's band
    groups = {}
    for item, header in usable:
        shapes = groups.setdefault((n_bands(header.samplerate), header.channels), {})
        count, first = shapes.get((header.samplerate, header.channels), (0, item.path))
        shapes[(header.samplerate, header.channels)] = (count + 1, first)
    if len(groups) > 1:
        kinds = sorted(((count, rate, channels, first) for shapes in groups.values()
                        for (rate, channels), (count, first) in shapes.items()), key=lambda kind: -kind[0])
        shown = "; ".join(f"{count} {'file' if count == 1 else 'files'} at {rate} Hz, "
                          f"{'mono' if channels == 1 else f'{channels} channels'} (e.g. {first})"
                          for count, rate, channels, first in kinds[:6])
        raise ValueError(f"the files' embeddings would differ in size or layout, so they cannot be compared (each "
                         f"sample rate has its band count, each channel its embedding): {shown}"
                         f"{'; ...' if len(kinds) > 6 else ''}. One evaluation takes files of one band count "
                         f"and channel count: resample or mix them down, or evaluate each kind on its own")


def _note_other_lengths(dataset, usable: list) -> None:
    """An utterance embedding moves with a clip's length (a 2 s clip cut to 0.25 s scored 0.15 against a bank of
    its own 2 s clips, against 5e-6 whole): test clips far shorter or longer than the bank's are said."""
    seconds = [(item, header.frames / header.samplerate) for item, header in usable]
    bank = [length for item, length in seconds if item.subset == "train"]
    if not bank:
        return
    typical = float(np.median(bank))
    odd = [(item.path, length) for item, length in seconds
           if item.subset == "test" and not typical / 2 <= length <= 2 * typical]
    if odd:
        dataset.notes.append(f"{counted(len(odd), 'test clip')} under half or over twice the bank clips' median length "
                             f"({typical:.2f} s; e.g. {odd[0][0]}, {odd[0][1]:.2f} s): an utterance embedding moves "
                             f"with a clip's length, so their scores measure that too")


def _windows_as_clips(items: list, vectors: list, window: tuple[float, float]) -> tuple[list, list]:
    """Each file's windows as clips of its own, labelled as the file, named by a media fragment (x.wav#t=10,20)."""
    soundfile = require("soundfile", "reading audio files")  # --task folder reads its files with it
    clips, rows = [], []
    for item, windowed in zip(items, vectors):
        header = audio_header(soundfile, item.path)  # its windows' spans are whole samples at its rate
        if header is None:  # not a traceback's AttributeError
            raise ValueError(f"{item.path} could not be read again for its windows' times: removed or changed since "
                             f"it was embedded? The same command scores again from the cache")
        rate = header.samplerate
        for number, row in enumerate(windowed):
            fragment = windows.fragment(number, *windows.spans(*window, rate), rate)
            clips.append(dataclasses.replace(item, path=Path(f"{item.path}{fragment}")))
            rows.append(row)
    return clips, rows


def _stack(vectors: list, items: list) -> np.ndarray:
    widths = {}
    for vector, item in zip(vectors, items):
        widths.setdefault(len(vector), item.path)
    if len(widths) > 1:
        shown = "; ".join(f"{width} values (e.g. {path})" for width, path in widths.items())
        raise ValueError(f"the embeddings differ in size, so they cannot be compared (files at different sample "
                         f"rates or channel counts): {shown}")
    return np.stack(vectors).astype(np.float32, copy=False)  # float32 already: not a second copy


def _fused_channels(args, dataset) -> list[int] | None:
    """The channel numbers of --channels, each one of the data set's (which must have several)."""
    if args.channels is None:
        return None
    if dataset.kind == "anomaly":
        raise ValueError(f"--channels chooses the channels fault classification fuses; {dataset.task} is anomaly "
                         f"detection, scored on all channels concatenated")
    if dataset.channels < 2:
        raise ValueError(f"--channels chooses among the channels of multi-channel data; {dataset.task}'s files have "
                         f"one")
    try:
        channels = [int(c) for c in args.channels.split(",")]
    except ValueError:
        raise ValueError(f"--channels {args.channels!r}: channel numbers separated by commas, e.g. 0,1,2") from None
    return neighbors.chosen_channels(channels, dataset.channels)


def _check_packages(args, dataset) -> None:
    """The optional packages the evaluation will import, refused before the encoding (hours on a large set) rather
    than after it, and before the headers' soundfile: a bare install is told the extra that has them all, `eval`,
    not soundfile's own `audio` first and `eval` after it."""
    require("sklearn", "computing the evaluation's metrics")
    if not args.no_plots:
        require("matplotlib", "drawing the plots (--no-plots leaves them out)")
    if args.search == "faiss" and dataset.kind == "anomaly":
        require("faiss", "--search faiss")


def _check_options(args, dataset) -> None:
    """What the data set cannot take, refused before the encoding (hours on a large set) rather than after it."""
    if not 0 < args.eps < 1:  # a floor of 0 divides by a zero AUC; one of 1 or more floors every score to it
        raise ValueError(f"--eps {args.eps}: the harmonic means' floor must be in (0, 1)")
    if args.batch_files < 1:  # said after the model was loaded, in embed_files' words (batch_files=0)
        raise ValueError(f"--batch-files {args.batch_files}: at least one file per batch")
    args.fused_channels = _fused_channels(args, dataset)  # parsed once, here, before the encoding
    if args.hop is not None and args.window is None:
        raise ValueError("--hop needs --window")
    if args.window is not None and dataset.task != "folder":  # a DCASE score is a clip's; a fold must keep a
        raise ValueError(f"--window: only --task folder scores windows; {args.task} scores its files whole")  # file
    try:
        args.window = None if args.window is None else windows.checked(args.window, args.hop)
    except ValueError as error:
        raise ValueError(f"--window, --hop: {error}") from None
    # options the task has no use for are refused, not ignored: the user meant them to change something
    if args.labels and dataset.year is None:
        raise ValueError(f"--labels: only the DCASE tasks read label lists; {args.task} takes its labels from its "
                         f"files and folders")
    if args.domain_auc is not None and (dataset.year or 0) < 2022:
        raise ValueError(f"--domain-auc: only DCASE 2022-2025 score a domain's AUC by either rule; {args.task} has "
                         f"one way")
    # recorded in results.json: none where the task has no rule to choose (no domains before 2022)
    args.domain_auc = args.domain_auc or ("official" if (dataset.year or 0) >= 2022 else None)
    if args.protocol and dataset.kind != "faults":
        raise ValueError(f"--protocol chooses among fault classification protocols; {args.task} is anomaly "
                         f"detection")
    if dataset.kind != "faults":
        # the anomaly score is the cosine distance to the nearest bank clip: no k, no folds
        given = [f"--{name}" for name in FAULT_DEFAULTS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} is an option of fault classification; {args.task} is anomaly detection")
        args.search = args.search or "torch"
        return
    if args.search is not None:
        raise ValueError(f"--search chooses the anomaly detection search; {args.task} is fault classification, "
                         f"searched exactly by torch")
    protocols = args.protocol or dataset.protocols
    if "kfold" not in protocols:
        given = [f"--{name}" for name in ("folds", "seed") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]}: only the kfold protocol takes it; {args.task} runs {', '.join(protocols)}")
    for name, default in FAULT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.k < 1:
        raise ValueError(f"--k {args.k}: at least one neighbour")
    if "kfold" in protocols and args.folds < 2:
        raise ValueError(f"--folds {args.folds}: k-fold needs two folds or more")
    if "kfold" in protocols and not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed}: a shuffle seed is from 0 to 2**32 - 1")
    if "split" in protocols and not any(item.subset for item in dataset.items):
        raise ValueError(f"--protocol split: {dataset.task} has no train/test split; use loocv or kfold")
    # one class, too many folds, a k above a bank: checked on the files as listed (evaluate checks again on those
    # embedded, which files that fail to read can make fewer)
    labels, subsets, groups = _labels_subsets_groups(dataset.items)
    faults.class_codes(labels)
    for protocol in protocols:
        faults.banks_and_queries(protocol, labels, args.k, subsets, groups, args.folds, args.seed)


def _labels_subsets_groups(items) -> tuple[list, list, list | None]:
    """Each file's class, train/test subset and group, as the fault protocols take them: no groups (None) where
    the data set groups none."""
    groups = [item.group for item in items]
    return [item.label for item in items], [item.subset for item in items], groups if any(groups) else None


def _anomaly(args, dataset, items, vectors, device) -> tuple[dict, object]:
    """The anomaly results, and a function that draws their plots (timed apart from the search)."""
    scores = anomaly.score_clips(items, vectors, device, args.search)
    rows, excluded = anomaly.group_metrics(items, scores, dataset.year, args.domain_auc or "official")
    # one's own folder has no DCASE splits, sections, domains or official score: its table does not make them up
    own = dataset.task == "folder"
    summary = {row["metric"]: row["value"] for row in rows} if own else anomaly.summarise(rows, dataset.year, args.eps)
    atomic.write_csv(args.out / "scores.csv", ["path", "label", "score"] if own else
                     ["path", "split", "machine", "section", "domain", "label", "score"], [
        {"path": c.path, "split": c.split, "machine": c.machine, "section": c.section, "domain": c.domain or "",
         "label": "" if c.label is None else c.label, "score": s} for c, s in zip(items, scores) if c.subset == "test"
    ])
    columns = [*DCASE_GROUP] * (not own) + ["metric", "value", "normals", "anomalies"]
    if own:  # nor do its groups in results.json
        rows, excluded = ([{key: value for key, value in group.items() if key not in DCASE_GROUP} for group in groups]
                          for groups in (rows, excluded))
    atomic.write_csv(args.out / "results.csv", columns, rows)
    clips = {"bank": sum(c.subset == "train" for c in items)} | {
        f"test {name}": sum(c.subset == "test" and c.label == label for c in items)
        for name, label in (("normal", 0), ("anomalous", 1), ("unlabelled", None))}
    same = [c.path for c, score in zip(items, scores) if c.subset == "test" and score == 0]
    if same:  # a leak from bank to test set, or digital silence (a dead sensor) in both: it scores as normal
        dataset.notes.append(f"{counted(len(same), 'test clip')} with an embedding equal to a bank clip's (score 0; "
                             f"e.g. {same[0]}): the same recording in the bank and the test set, or silence in both")
        print(f"note: {dataset.notes[-1]}")
    print(f"scored {counted(sum(c.subset == 'test' for c in items), 'test clip')} ({clips['test normal']} normal, "
          f"{clips['test anomalous']} anomalous, {clips['test unlabelled']} unlabelled: scores.csv only) against "
          f"{counted(clips['bank'], 'normal bank clip')}")
    print(format_table(rows, columns) if rows else "no labelled test clip with both classes: nothing to measure")
    for group in excluded:
        where = "" if own else f"{group['split']} {group['machine']} section {group['section']} {group['domain']} "
        print(f"excluded (one class only): {where}{group['metrics']}: {group['normals']} normal, "
              f"{group['anomalies']} anomalous")
    for name, value in summary.items():
        print(f"{name}: {value:.4f}")

    def draw() -> list:
        figures = plots.anomaly_plots(items, scores, args.out, dcase=not own)
        tests = [i for i, c in enumerate(items) if c.subset == "test"]
        labels = [{0: "normal", 1: "anomalous", None: "unlabelled"}[items[i].label] for i in tests]
        figures.append(plots.projection_plot(vectors[tests], labels, args.out / "projection.png",
                                             "test clips (PCA of the embeddings)"))
        return figures
    return {"groups": rows, "excluded": excluded, "summary": summary, "clips": clips}, draw


def _faults(args, dataset, items, vectors, device) -> tuple[dict, object]:
    """The fault results, and a function that draws their plots (timed apart from the search)."""
    embeddings = vectors.reshape(len(vectors), dataset.channels, -1)
    labels, subsets, groups = _labels_subsets_groups(items)
    views = [(None, False)]
    if dataset.channels > 1:
        views += [([c], False) for c in range(dataset.channels)] + [(args.fused_channels, True)]
    searches = [(protocol, channels, fuse) for protocol in (args.protocol or dataset.protocols)
                for channels, fuse in views]
    # MAFAULDA-sized (1951 files x 7 channels) leave-one-out took 224 s for its 9 views on 2 cores: said as it goes,
    # not minutes of silence after the embedding bar
    results = [faults.evaluate(embeddings, labels, protocol, args.k, subsets, channels, fuse, args.folds,
                               args.seed, device, groups)
               for protocol, channels, fuse in tqdm(searches, desc="searching", unit="view", disable=args.quiet)]
    rows = [result.row() for result in results]
    columns = ["protocol", "view", "files", "accuracy", "precision", "recall", "f1", "fold_mean", "fold_std"]
    atomic.write_csv(args.out / "results.csv", columns, rows)
    print(format_table(rows, columns))

    def draw() -> list:
        figures = []
        for result in results:
            if result.view == "all" or result.view.startswith("fused"):
                name = f"confusion_{result.protocol}_{result.view.split()[0]}.png"
                figures.append(plots.confusion_plot(result, args.out / name))
        figures.append(plots.projection_plot(vectors, labels, args.out / "projection.png",
                                             f"{dataset.task} (PCA of the embeddings)"))
        return figures
    details = [{**result.row(), "classes": result.classes, "confusion": result.confusion.tolist(),
                "fold_accuracies": result.fold_accuracies} for result in results]
    return {"results": details}, draw


# what a run writes to --out (the plots' names follow the task's groups)
OUTPUTS = ("results.csv", "results.json", "scores.csv", "failures.csv", "roc_*.png", "scores_*.png", "confusion_*.png",
           "projection.png")


def run(args) -> int:
    try:
        return _run(args)
    except ImportError as error:  # an optional dependency is missing: say which and how to install it
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .. import checkpoint, host_memory, inputs

    started = time.perf_counter()
    device = inputs.checked_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # before the encoding, not after it; made once the data, options and model are found fit, so that a command
    # refused for them leaves no empty folder behind
    atomic.check_can_make(args.out, f"--out {args.out}")
    for output in OUTPUTS:  # a killed run's temporaries: nothing else would ever delete them
        atomic.remove_abandoned(args.out, f"{output}.[0-9]*.tmp")
    if args.cache is not None:
        atomic.check_can_make(args.cache, f"--cache {args.cache}")
    dataset = datasets.load(args.task, args.data, args.labels)
    _check_packages(args, dataset)
    _check_headers(dataset, windowed=args.window is not None)  # before the options: it tells the channels
    _check_options(args, dataset)  # --channels chooses among
    for note in dataset.notes:
        print(f"note: {note}")
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    model = checkpoint.load(args.model, device=device)
    atomic.check_writable(args.out, f"--out {args.out}")
    cache = args.cache or args.out / "cache"
    embedded = embed_files(model, [item.path for item in dataset.items], dataset.read, cache, None, device,
                           DTYPES[args.dtype], args.batch_files, progress=not args.quiet,
                           reader_version=datasets.READERS_VERSION, window=args.window)
    try:
        return _results(args, dataset, embedded, started, device)
    except OSError as error:  # a full disk: "[Errno 28]" alone named neither the folder nor the embeddings kept
        said = error if error.filename else OSError(f"{args.out}: the results could not be written ({error})")
        raise WorkKept(f"the embeddings of {counted(embedded.cached + embedded.encoded, 'file')} are kept in {cache}; "
                       f"the same command writes the results without encoding them again") from said


def _results(args, dataset, embedded, started: float, device) -> int:
    """Search, score and write the results of the files `embed_files` gave (`embedded`)."""
    atomic.write_csv(args.out / "failures.csv", ["path", "reason"],
                     [{"path": shown(p), "reason": r} for p, r in embedded.failures])
    for path, reason in embedded.failures:
        print(f"skipped {shown(path)}: {reason}")
    kept = [i for i, vector in enumerate(embedded.vectors) if vector is not None]
    if not kept:
        raise ValueError(f"no file of {args.data} could be embedded ({len(embedded.failures)} failures, see "
                         f"{args.out / 'failures.csv'})")
    items, vectors = [dataset.items[i] for i in kept], [embedded.vectors[i] for i in kept]
    if args.window is not None:
        items, vectors = _windows_as_clips(items, vectors, args.window)
        print(f"clips: {counted(len(items), 'window')} of {args.window[0]:g} s, one every {args.window[1]:g} s, of "
              f"{counted(len(kept), 'file')}; each scored as a clip, labelled as its file")
    vectors = _stack(vectors, items)
    embedded.vectors.clear()  # the stacked rows are the ones searched: not both held through the search
    search_started = time.perf_counter()
    evaluate = _anomaly if dataset.kind == "anomaly" else _faults
    results, draw = evaluate(args, dataset, items, vectors, device)
    search_seconds = time.perf_counter() - search_started
    # timed apart: 300 clips took "search + metrics 3.9 s" with plots, 0.5 s without
    figures = [] if args.no_plots else draw()
    plot_seconds = time.perf_counter() - search_started - search_seconds
    total = time.perf_counter() - started
    speed = {"files": len(dataset.items), "embedded": len(kept), "failed": len(embedded.failures),
             "from_cache": embedded.cached, "encoded": embedded.encoded, "seconds": total,
             "files_per_second": len(dataset.items) / total, "encode_seconds": embedded.encode_seconds,
             "read_wait_seconds": embedded.read_seconds, "search_and_metrics_seconds": search_seconds,
             "plot_seconds": plot_seconds}
    summary = {"task": args.task, "data": str(args.data), "model": str(args.model), "domain_auc": args.domain_auc,
               "window": None if args.window is None else dict(zip(("seconds", "hop"), args.window)),
               "notes": dataset.notes, **results, "failures": [(shown(p), r) for p, r in embedded.failures],
               "speed": speed, "plots": [p.name for p in figures]}
    atomic.write_text(args.out / "results.json", json.dumps(_json_values(summary), indent=2, default=str) + "\n")
    print(f"{counted(len(dataset.items), 'file')} ({embedded.cached} from the cache, {len(embedded.failures)} failed) "
          f"in {total:.1f} s: {speed['files_per_second']:.1f} files/s; encoding {embedded.encode_seconds:.1f} s "
          f"({100 * embedded.encode_seconds / total:.0f}%), search + metrics {search_seconds:.1f} s "
          f"({100 * search_seconds / total:.0f}%), plots {plot_seconds:.1f} s ({100 * plot_seconds / total:.0f}%); "
          f"results in {args.out}")
    return 0
