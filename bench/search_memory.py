"""Peak memory and time of one exact kNN search (`neighbors.nearest`) over a bank of random float32 rows.

The search holds the prepared (float64) queries, one chunk of prepared bank rows (at most 65,536 rows and 1 GiB)
and one block of the distance matrix (256 MiB): the peak over the data should stay near that, whatever the bank.

    python bench/search_memory.py                                      # 100 queries, 10^4 x 20,000 bank
    python bench/search_memory.py --bank 2000 --queries 2000 --features 53760   # MAFAULDA-wide leave-one-out
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from _shared import positive_int
from echo.eval import neighbors


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=positive_int, default=10000)
    parser.add_argument("--queries", type=positive_int, default=100)
    parser.add_argument("--features", type=positive_int, default=20000)
    parser.add_argument("--k", type=positive_int, default=5)
    parser.add_argument("--metric", choices=neighbors.METRICS, default="euclidean")
    args = parser.parse_args()
    if args.k > args.bank:
        parser.error(f"--k {args.k} is more than the --bank {args.bank} rows")
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((args.bank, args.features), dtype=np.float32)
    queries = bank[:args.queries] + np.float32(0.1) if args.queries <= args.bank else rng.standard_normal(
        (args.queries, args.features), dtype=np.float32)
    start_mb = peak_mb()
    start = time.perf_counter()
    neighbors.nearest(queries, bank, args.k, args.metric)
    seconds = time.perf_counter() - start
    data_mb = (bank.nbytes + queries.nbytes) / 2**20
    print(f"{args.queries} queries, bank {args.bank} x {args.features} float32 ({data_mb:.0f} MB in all), "
          f"k={args.k}, {args.metric}")
    print(f"search: {seconds:.1f} s, peak +{peak_mb() - start_mb:.0f} MB over the {start_mb:.0f} MB before it "
          f"(prepared queries {queries.nbytes * 2 / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
