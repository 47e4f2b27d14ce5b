"""Exact k-nearest-neighbour search by chunked matrix products, on the encode device.

A (queries x bank) distance matrix is never held whole: the bank is visited in chunks and a running top-k is
merged, so memory stays bounded for banks of 10^6 x 7680. The search ranks by |q|^2 + |b|^2 - 2 q.b, on rows
scaled to unit length for cosine (|q - b|^2 = 2 (1 - cos) there), after centring both sides on the bank mean
(translation leaves distances unchanged and removes most of the cancellation): fast, but off by up to ~E ulps
of (|q| + |b|)^2, which scrambles near-duplicates and leaves equal rows ~|q| sqrt(eps) apart. So each query's
best candidates, all those within that bound of the k-th, are measured again from the rows' differences:
accurate relative to the distance itself, exactly 0 between equal rows, never below 0. A query with more
candidates inside the bound than the search handed over is searched again for more. `backend="faiss"` uses
faiss's exact flat index for the search instead, for banks that outgrow the device.

Among neighbours at exactly equal distance the lower bank index comes first.
"""
from __future__ import annotations

from functools import lru_cache, partial

import numpy as np
import torch

from ..inputs import first_items
from . import require

METRICS = ("euclidean", "cosine")
CHUNK_BYTES = 256 * 2**20  # one chunk of the distance matrix
BANK_CHUNK_ROWS = 65536
EXTRA_CANDIDATES = 16  # beyond k, so that few queries need a second search to hold every candidate


def check_finite(rows, name: str) -> None:
    """A NaN or infinite value would turn distances into NaN and neighbours into made-up indices (-1), or make
    one row the farthest of all: refused, naming the first rows that hold one. Tensors are checked where they
    are (a bank on the GPU is not copied)."""
    if isinstance(rows, torch.Tensor):
        finite = torch.isfinite(rows.flatten(1)).all(dim=1) if rows.dim() > 1 else torch.isfinite(rows)
        bad = (~finite).nonzero().flatten().cpu().numpy()
    else:
        values = np.asarray(rows)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=tuple(range(1, values.ndim))))
    if len(bad):
        raise ValueError(f"{name}: row(s) {first_items(bad)} hold NaN or infinite values")


def as_rows(embeddings, name: str = "embeddings") -> np.ndarray:
    """Embeddings as one array of finite rows. Embeddings of different shapes (two models, or rates with other
    band counts) and NaN or infinite values are named here rather than by numpy or as made-up neighbours."""
    try:
        rows = np.asarray(embeddings)
    except ValueError:
        shapes = sorted({np.shape(row) for row in embeddings})
        raise ValueError(f"{name} differ in shape ({', '.join(map(str, shapes[:4]))}): one model and one sample "
                         f"rate (band count) per evaluation") from None
    if rows.dtype == object:
        raise ValueError(f"{name} must be numbers of one shape, got objects")
    if len(rows) == 0:
        raise ValueError(f"no {name} to evaluate")
    check_finite(rows, name)
    return rows


def chosen_channels(channels, count: int) -> list[int]:
    """The channels asked for (all of them by default), each one of the data's `count`."""
    channels = list(range(count)) if channels is None else list(channels)
    if not channels or not all(0 <= c < count for c in channels):
        raise ValueError(f"channels {channels} must be a non-empty subset of 0..{count - 1}")
    return channels


def _as_matrix(x, name: str, device, dtype=None) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (rows, features) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    check_finite(x, name)
    return x.to(device=device, dtype=dtype or x.dtype)


def _check(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str, exclude) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}")
    if exclude is not None and np.shape(exclude) != (queries.shape[0],):
        raise ValueError(f"exclude must hold one bank row (or -1) per query: {queries.shape[0]} values, "
                         f"got shape {tuple(np.shape(exclude))}")
    available = bank.shape[0] - (exclude is not None)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours asked of a bank of {bank.shape[0]} rows"
                         + (" (each query's own row excluded)" if exclude is not None else ""))


def _search_values(queries: torch.Tensor, bank: torch.Tensor, bank_sq=None) -> torch.Tensor:
    """(Q, B) squared distances of prepared rows, within the bound of `_search_limit`."""
    queries_sq = (queries * queries).sum(1, keepdim=True)
    bank_sq = (bank * bank).sum(1) if bank_sq is None else bank_sq
    return (queries_sq + bank_sq - 2 * queries @ bank.T).clamp_min_(0)


def _search_limit(metric: str, eps: float, search_eps: float, dim: int, query_norms: torch.Tensor,
                  kth: torch.Tensor) -> torch.Tensor:
    """The largest search value that a bank row as near as the k-th neighbour (exact distance `kth`) can get.
    With u = eps / 2 and r the k-th's distance between prepared rows: the search's E-term products and sums and
    the centring are off by at most (E + 4) u (|q| + |b|)^2, where |b| <= 2 |q| + r; cosine's norms, each off
    by at most (E / 2 + 1) u, move q - b by (E + 4) u; kth is off by u. Taken as (E + 8) eps, for margin."""
    if metric == "euclidean":
        return kth * kth * (1 + 2 * eps) + (dim + 8) * search_eps * (2 * query_norms + kth) ** 2
    apart = (2 * kth).sqrt()
    return apart * apart * (1 + 2 * eps) + (dim + 8) * (search_eps * (2 * query_norms + apart) ** 2 + eps * apart)


def _exact_distances(queries: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, M) distances of query rows (Q, E) to their own candidate rows (Q, M, E), both as given, from their
    differences: relative to the distance, not to |q|, and exactly 0 between equal rows."""
    apart = candidates - queries[:, None]
    if metric == "euclidean":
        return torch.linalg.vector_norm(apart, dim=2)
    # 1 - cos = |v|^2 / 2 with v = c/|c| - q/|q| = apart/|q| - s c, s = (|c| - |q|) / (|q| |c|), and
    # |c| - |q| = apart.(c + q) / (|c| + |q|): no difference of nearly equal numbers is rounded
    q_norm, c_norm = queries.norm(dim=1, keepdim=True), candidates.norm(dim=2)
    s = (torch.einsum("qme,qme->qm", apart, candidates) + torch.einsum("qme,qe->qm", apart, queries)) / (
        (c_norm + q_norm) * q_norm * c_norm)
    v = apart.div_(q_norm[..., None]).addcmul_(candidates, s[..., None], value=-1)  # in place: the big one
    return (torch.einsum("qme,qme->qm", v, v) / 2).where((q_norm > 0) & (c_norm > 0), 1)  # zero rows: 1 off


def _preparer(bank: torch.Tensor, metric: str, device):
    """The map applied to query and bank rows before `_search_values`. Cosine's centre, the bank's sum over the
    sum of its norms, is a mean of the unit rows (weighted by norm) for the price of one pass of norms."""
    if metric == "euclidean":
        centre = bank.mean(0, keepdim=True).to(device)
        return lambda rows: rows - centre
    centre = (bank.sum(0, keepdim=True) / torch.linalg.vector_norm(bank, dim=1).sum().clamp_min(1e-12)).to(device)
    # F.normalize(rows) - centre in one pass over the rows
    return lambda rows: torch.addcdiv(-centre, rows, rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _smallest(distances: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `take` smallest distances of each row and their columns, ascending, equal distances in column
    order: torch.topk picks among equal distances in any order, which could flip a tied kNN vote."""
    values, columns = torch.topk(distances, take, dim=1, largest=False, sorted=True)
    crowded = (distances <= values[:, -1:]).sum(1) > take  # more columns at the last value than places left
    if crowded.any():  # rare outside duplicated or quantised embeddings: sort those rows whole
        rows = crowded.nonzero().flatten()
        order = torch.sort(distances[rows], dim=1, stable=True).indices[:, :take]
        values[rows], columns[rows] = distances[rows].gather(1, order), order
    columns, by_column = columns.sort(dim=1)
    values, by_value = values.gather(1, by_column).sort(dim=1, stable=True)
    return values, columns.gather(1, by_value)


def nearest(queries, bank, k: int = 1, metric: str = "euclidean", exclude=None, device=None,
            backend: str = "torch", chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k), bank indices (Q, k)), ascending per row.

    `exclude`: for each query, one bank row it may not match (its own row in leave-one-out), or -1.
    Searched in the inputs' dtype (float32 unless float64 is passed; faiss: float32), the k nearest measured
    in float64 and returned in the inputs' dtype.
    """
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown search backend {backend!r}; known: torch, faiss")
    device = torch.device("cpu" if backend == "faiss" else device or "cpu")
    queries = _as_matrix(queries, "queries", device)
    bank = _as_matrix(bank, "bank", "cpu", queries.dtype)
    exclude = None if exclude is None else torch.as_tensor(np.asarray(exclude), dtype=torch.long, device=device)
    _check(queries, bank, k, metric, exclude)
    prepare = _preparer(bank, metric, device)
    prepared = prepare(queries)
    if backend == "faiss":
        search = partial(_search_faiss, index=_faiss_index(prepare(bank)))
    else:
        chunk = lru_cache(maxsize=1)(partial(_prepared_chunk, bank, prepare, device))  # 1 chunk: prepared once
        search = partial(_search_torch, chunk=chunk, bank_size=bank.shape[0], chunk_bytes=chunk_bytes)
    eps = torch.finfo(queries.dtype).eps
    search_eps = torch.finfo(torch.float32).eps if backend == "faiss" else eps
    best_d = torch.empty((queries.shape[0], k), dtype=queries.dtype, device=device)
    best_i = torch.empty((queries.shape[0], k), dtype=torch.long, device=device)
    pending = torch.arange(queries.shape[0], device=device)
    wanted = k + (exclude is not None) + EXTRA_CANDIDATES
    while len(pending):
        wanted = min(wanted, bank.shape[0])
        candidates, reach = search(prepared[pending], wanted=wanted)
        skip = None if exclude is None else exclude[pending]
        d, i = _rerank(queries[pending], bank, candidates, k, metric, skip, chunk_bytes)
        best_d[pending], best_i[pending] = d, i
        # every other row's search value is at least reach: above the limit, none can be as near as the k-th
        limit = _search_limit(metric, eps, search_eps, bank.shape[1], prepared[pending].norm(dim=1), d[:, -1])
        settled = (reach > limit) | (wanted == bank.shape[0])
        pending = pending[~settled]
        wanted *= 4
    return best_d.cpu().numpy(), best_i.cpu().numpy()


def _prepared_chunk(bank: torch.Tensor, prepare, device, b0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared bank rows from b0 on, one chunk's worth, and their squared norms."""
    rows = prepare(bank[b0:b0 + BANK_CHUNK_ROWS].to(device))
    return rows, (rows * rows).sum(1)


def _search_torch(queries: torch.Tensor, chunk, bank_size: int, wanted: int,
                  chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prepared query's `wanted` bank rows of smallest search value (Q, wanted), in any order, and the
    largest of those values (Q,). chunk(b0): as `_prepared_chunk`."""
    best_v = torch.full((queries.shape[0], wanted), float("inf"), dtype=queries.dtype, device=queries.device)
    best_i = torch.zeros((queries.shape[0], wanted), dtype=torch.long, device=queries.device)
    query_rows = max(1, chunk_bytes // (min(bank_size, BANK_CHUNK_ROWS) * queries.element_size()))
    for b0 in range(0, bank_size, BANK_CHUNK_ROWS):
        rows_b, rows_sq = chunk(b0)
        take = min(wanted, rows_b.shape[0])
        for q0 in range(0, queries.shape[0], query_rows):
            rows = slice(q0, q0 + query_rows)
            chunk_v, chunk_i = torch.topk(_search_values(queries[rows], rows_b, rows_sq), take, dim=1,
                                          largest=False, sorted=False)
            merged_v = torch.cat([best_v[rows], chunk_v], dim=1)
            merged_i = torch.cat([best_i[rows], chunk_i + b0], dim=1)
            best_v[rows], order = torch.topk(merged_v, wanted, dim=1, largest=False, sorted=False)
            best_i[rows] = merged_i.gather(1, order)
    return best_i, best_v.max(1).values


def _faiss_index(bank: torch.Tensor):
    """faiss's exact flat (squared Euclidean) index of the prepared bank rows, in float32."""
    faiss = require("faiss", "backend='faiss'")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.float().numpy()))
    return index


def _search_faiss(queries: torch.Tensor, index, wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As `_search_torch`, by faiss, in float32."""
    values, candidates = index.search(np.ascontiguousarray(queries.float().numpy()), wanted)
    return torch.from_numpy(candidates), torch.from_numpy(values[:, -1]).to(queries.dtype)


def _rerank(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, k: int, metric: str, exclude,
            chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each query's candidates (Q, M) by `_exact_distances` of the rows as given, in float64
    (float32 sums of E terms keep ~sqrt(E) ulps) rounded to the inputs' dtype, equal distances in bank order."""
    candidates = candidates.sort(dim=1).values
    query_rows = max(1, chunk_bytes // (candidates.shape[1] * bank.shape[1] * 8))
    distances = []
    for q0 in range(0, queries.shape[0], query_rows):
        rows = candidates[q0:q0 + query_rows]
        distances.append(_exact_distances(queries[q0:q0 + query_rows].double(),
                                          bank[rows.cpu()].to(rows.device, torch.float64), metric))
    distances = torch.cat(distances).to(queries.dtype)
    if exclude is not None:
        distances.masked_fill_(candidates == exclude[:, None], float("inf"))
    values, columns = _smallest(distances, k)
    return values, candidates.gather(1, columns)


def fused_nearest(queries, bank, k: int, channels=None, exclude=None, device=None,
                  chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by the fused multi-channel distance: each (query, channel) row of Euclidean
    distances is z-scored over the bank (population std; a query's excluded row takes no part), then the
    chosen channels are averaged. queries (Q, C, E), bank (B, C, E) -> (fused distances, indices) (Q, k)."""
    device = torch.device(device or "cpu")
    queries = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    bank = torch.as_tensor(np.asarray(bank) if not isinstance(bank, torch.Tensor) else bank)
    if queries.dim() != 3 or bank.dim() != 3 or queries.shape[1:] != bank.shape[1:]:
        raise ValueError(f"fused search needs (rows, channels, features) for both sides with equal channels and "
                         f"features, got queries {tuple(queries.shape)} and bank {tuple(bank.shape)}")
    check_finite(queries, "queries")
    check_finite(bank, "bank")
    channels = chosen_channels(channels, bank.shape[1])
    dtype = queries.dtype if queries.is_floating_point() else torch.float64
    queries, bank = queries.to(device, dtype), bank.to(device, dtype)
    exclude = None if exclude is None else torch.as_tensor(np.asarray(exclude), dtype=torch.long, device=device)
    _check(queries[:, 0], bank[:, 0], k, "euclidean", exclude)
    prepared = []
    for c in channels:
        prepare = _preparer(bank[:, c], "euclidean", device)
        prepared.append((prepare(queries[:, c]), prepare(bank[:, c])))
    bank_sq = [(b * b).sum(1) for _, b in prepared]
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    columns = torch.arange(n_bank, device=device)
    query_rows = max(1, chunk_bytes // (2 * n_bank * queries.element_size()))
    out_d, out_i = [], []
    for q0 in range(0, n_queries, query_rows):
        rows = slice(q0, q0 + query_rows)
        valid = torch.ones(queries[rows].shape[0], n_bank, dtype=queries.dtype, device=device)
        if exclude is not None:
            valid.masked_fill_(exclude[rows, None] == columns[None, :], 0)
        count = valid.sum(1, keepdim=True)
        fused = torch.zeros_like(valid)
        for (q, b), b_sq in zip(prepared, bank_sq):
            distances = _search_values(q[rows], b, b_sq).sqrt_()
            mean = (distances * valid).sum(1, keepdim=True) / count
            std = ((((distances - mean) * valid) ** 2).sum(1, keepdim=True) / count).sqrt()
            fused += (distances - mean) / torch.where(std > 0, std, torch.ones_like(std))
        fused /= len(channels)
        fused.masked_fill_(valid == 0, float("inf"))
        d, i = _smallest(fused, k)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d).cpu().numpy(), torch.cat(out_i).cpu().numpy()
