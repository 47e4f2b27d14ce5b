"""Leave-one-group-out fault classification: one search (each query's group masked out of the bank) against one
search per group (each preparing nearly the whole bank again), on the same random embeddings, in one run.

Both must give the same predictions (checked, ties included: the rows are rounded so that some repeat); the
time is faults.evaluate's, search and vote, without encoding.

    python bench/fault_groups_speed.py                          # 10^4 rows of 768 in 36 groups
    python bench/fault_groups_speed.py --rows 2000 --groups 8   # a quick look
    python bench/fault_groups_speed.py --fuse 3                 # the fused distance over 3 channels of 768
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _shared import positive_int
from echo.eval import faults


def per_group(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, fuse: bool) -> np.ndarray:
    """The earlier way: a search for each group, its bank every row outside it."""
    classes, codes = faults.class_codes(labels)
    predictions = np.empty_like(labels)
    for bank, queries, own in faults.banks_and_queries("loocv", labels, k, groups=groups):
        predictions[queries] = classes[faults.predict(embeddings[bank], codes[bank], embeddings[queries], k,
                                                      fuse=fuse, exclude=own)]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=positive_int, default=10000)
    parser.add_argument("--dim", type=positive_int, default=768)
    parser.add_argument("--groups", type=positive_int, default=36)
    parser.add_argument("--classes", type=positive_int, default=4)
    parser.add_argument("--k", type=positive_int, default=5)
    parser.add_argument("--fuse", type=positive_int, metavar="CHANNELS",
                        help="rows of this many channels of --dim, searched by the fused distance")
    args = parser.parse_args()
    for option, value in (("--groups", args.groups), ("--classes", args.classes)):
        if value < 2:
            parser.error(f"{option} must be at least 2, got {value}")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.rows)
    shape = (args.fuse, args.dim) if args.fuse else (args.dim,)
    centres = rng.normal(size=(args.classes, *shape))
    embeddings = np.round(centres[labels] + 2 * rng.normal(size=(args.rows, *shape)), 1).astype(np.float32)
    fuse = args.fuse is not None
    groups = np.array([f"session {g}" for g in rng.integers(0, args.groups, args.rows)])

    try:  # k above a bank, one class: the library's own message
        faults.banks_and_queries("loocv", labels, args.k, groups=groups)
        faults.class_codes(labels)
    except ValueError as error:
        parser.error(f"--rows {args.rows}, --groups {args.groups}, --classes {args.classes}, --k {args.k}: {error}")
    warm = slice(0, 8 * args.groups)  # one-time costs (first products, imports) timed in neither
    per_group(embeddings[warm], labels[warm], groups[warm], 1, fuse)
    faults.evaluate(embeddings[warm], labels[warm], "loocv", 1, fuse=fuse, groups=groups[warm])
    start = time.perf_counter()
    old = per_group(embeddings, labels, groups, args.k, fuse)
    old_seconds = time.perf_counter() - start
    start = time.perf_counter()
    new = faults.evaluate(embeddings, labels, "loocv", args.k, fuse=fuse, groups=groups).y_pred
    new_seconds = time.perf_counter() - start

    print(f"leave-one-group-out, {args.rows} rows of {' x '.join(map(str, shape))} floats in "
          f"{len(np.unique(groups))} groups, {args.classes} classes, k={args.k}"
          + (f", fused over {args.fuse} channels" if fuse else ""))
    print(f"one search per group: {old_seconds:8.2f} s")
    print(f"one masked search:    {new_seconds:8.2f} s   speed-up {old_seconds / new_seconds:.2f}x")
    print(f"same predictions: {bool(np.array_equal(old, new))}")


if __name__ == "__main__":
    main()
