"""Exact k-nearest-neighbour search by chunked matrix products, on the encode device.

A (queries x bank) distance matrix is never held whole: the bank is visited in chunks and a running top-k is
merged, so memory stays bounded for banks of 10^6 x 7680. Euclidean distances use |q|^2 + |b|^2 - 2 q.b after
centring both sides on the bank mean (translation leaves distances unchanged and the centring removes most of
the cancellation). Cosine distance is 1 - q.b on L2-normalised rows, never below 0, and exactly 0 between equal
rows (rounding leaves them a few ulps either side). `backend="faiss"` uses faiss's exact flat indexes instead,
for banks that outgrow the device.

Among neighbours at exactly equal distance the lower bank index comes first.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..inputs import first_items
from . import require

METRICS = ("euclidean", "cosine")
CHUNK_BYTES = 256 * 2**20  # one chunk of the distance matrix
BANK_CHUNK_ROWS = 65536
FAISS_EXTRA_CANDIDATES = 16  # candidates beyond k that faiss's float32 ranking hands over for exact ranking


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


def pairwise_distances(queries: torch.Tensor, bank: torch.Tensor, metric: str, bank_sq=None) -> torch.Tensor:
    """(Q, B) distances of prepared rows (centred for euclidean, unit-norm for cosine)."""
    products = queries @ bank.T
    if metric == "cosine":
        return (1 - products).clamp_min_(0)
    queries_sq = (queries * queries).sum(1, keepdim=True)
    bank_sq = (bank * bank).sum(1) if bank_sq is None else bank_sq
    return (queries_sq + bank_sq - 2 * products).clamp_min_(0).sqrt_()


def _zero_equal_rows(distances: torch.Tensor, queries: torch.Tensor, bank: torch.Tensor, columns=None) -> None:
    """Sets the cosine distances (Q, M) between equal rows to exactly 0. queries (Q, E) and bank (B, E) are the
    rows as given (normalising two copies of a row apart may round them apart); columns (Q, M) the bank row of
    each distance, or None for bank rows in order. Only pairs within the rounding of 1 - q.q whose first values
    agree are compared whole, a slice at a time in no more memory than the distances."""
    bound = 2 * queries.shape[1] * torch.finfo(distances.dtype).eps  # normalising and the product: each < E ulps
    first = bank[:, 0].contiguous()  # a strided column would be read E apart for every query
    maybe = (distances <= bound) & (queries[:, :1] == (first if columns is None else first[columns]))
    for pairs in maybe.nonzero().split(max(1, maybe.numel() // queries.shape[1])):
        q, m = pairs.T
        equal = (queries[q] == bank[m if columns is None else columns[q, m]]).all(1)
        distances[q[equal], m[equal]] = 0


def _preparer(bank: torch.Tensor, metric: str, device):
    """The map applied to query and bank rows before `pairwise_distances`."""
    if metric == "cosine":
        return lambda rows: F.normalize(rows, dim=1)
    centre = bank.mean(0, keepdim=True).to(device)
    return lambda rows: rows - centre


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
    Computed in the inputs' dtype (float32 unless float64 is passed).
    """
    if backend == "faiss":
        return _nearest_faiss(queries, bank, k, metric, exclude)
    if backend != "torch":
        raise ValueError(f"unknown search backend {backend!r}; known: torch, faiss")
    device = torch.device(device or "cpu")
    queries = _as_matrix(queries, "queries", device)
    bank = _as_matrix(bank, "bank", "cpu", queries.dtype)
    exclude = None if exclude is None else torch.as_tensor(np.asarray(exclude), dtype=torch.long, device=device)
    _check(queries, bank, k, metric, exclude)
    prepare = _preparer(bank, metric, device)
    given, queries = queries, prepare(queries)
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    best_d = torch.full((n_queries, k), float("inf"), dtype=queries.dtype, device=device)
    best_i = torch.full((n_queries, k), -1, dtype=torch.long, device=device)
    bank_rows = min(n_bank, BANK_CHUNK_ROWS)
    query_rows = max(1, chunk_bytes // (bank_rows * queries.element_size()))
    for b0 in range(0, n_bank, bank_rows):
        given_chunk = bank[b0:b0 + bank_rows].to(device)
        chunk = prepare(given_chunk)
        chunk_sq = (chunk * chunk).sum(1)
        columns = torch.arange(b0, b0 + chunk.shape[0], device=device)
        take = min(k, chunk.shape[0])
        for q0 in range(0, n_queries, query_rows):
            rows = slice(q0, q0 + query_rows)
            distances = pairwise_distances(queries[rows], chunk, metric, chunk_sq)
            if metric == "cosine":
                _zero_equal_rows(distances, given[rows], given_chunk)
            if exclude is not None:
                distances.masked_fill_(exclude[rows, None] == columns[None, :], float("inf"))
            chunk_d, chunk_i = _smallest(distances, take)
            merged_d = torch.cat([best_d[rows], chunk_d], dim=1)
            merged_i = torch.cat([best_i[rows], chunk_i + b0], dim=1)
            order = torch.sort(merged_d, dim=1, stable=True).indices[:, :k]
            best_d[rows] = merged_d.gather(1, order)
            best_i[rows] = merged_i.gather(1, order)
    return best_d.cpu().numpy(), best_i.cpu().numpy()


def _nearest_faiss(queries, bank, k: int, metric: str, exclude,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """faiss's flat index finds each query's nearest candidates in float32; their distances are then computed
    again in the inputs' dtype and ranked as the torch search ranks them (1 - cos between clips 1 % apart is
    ~1e-4, of which float32 keeps two or three digits)."""
    faiss = require("faiss", "backend='faiss'")
    queries = _as_matrix(queries, "queries", "cpu")
    bank = _as_matrix(bank, "bank", "cpu", queries.dtype)
    _check(queries, bank, k, metric, exclude)
    prepare = _preparer(bank, metric, "cpu")
    given, given_bank = queries, bank
    queries, bank = prepare(queries), prepare(bank)
    index = faiss.IndexFlatIP(bank.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.float().numpy()))
    wanted = min(bank.shape[0], k + 1 + FAISS_EXTRA_CANDIDATES)
    candidates = torch.from_numpy(index.search(np.ascontiguousarray(queries.float().numpy()), wanted)[1])
    candidates = candidates.masked_fill(candidates < 0, bank.shape[0]).sort(dim=1).values  # bank order
    invalid = candidates == bank.shape[0]
    if exclude is not None:
        invalid |= candidates == torch.as_tensor(np.asarray(exclude), dtype=torch.long)[:, None]
    candidates = candidates.clamp_max(bank.shape[0] - 1)
    query_rows = max(1, chunk_bytes // (wanted * bank.shape[1] * bank.element_size()))
    distances = []
    for q0 in range(0, queries.shape[0], query_rows):
        rows = slice(q0, q0 + query_rows)
        distances.append(_candidate_distances(queries[rows], bank[candidates[rows]], metric))
        if metric == "cosine":
            _zero_equal_rows(distances[-1], given[rows], given_bank, candidates[rows])
    distances = torch.cat(distances)
    values, columns = _smallest(distances.masked_fill(invalid, float("inf")), k)
    return values.numpy(), candidates.gather(1, columns).numpy()


def _candidate_distances(queries: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, M) distances of prepared query rows (Q, E) to their own candidate rows (Q, M, E), by the formula of
    pairwise_distances, so that both searches round alike."""
    products = torch.einsum("qe,qme->qm", queries, candidates)
    if metric == "cosine":
        return (1 - products).clamp_min_(0)
    queries_sq = (queries * queries).sum(1, keepdim=True)
    return (queries_sq + (candidates * candidates).sum(2) - 2 * products).clamp_min_(0).sqrt_()


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
            distances = pairwise_distances(q[rows], b, "euclidean", b_sq)
            mean = (distances * valid).sum(1, keepdim=True) / count
            std = ((((distances - mean) * valid) ** 2).sum(1, keepdim=True) / count).sqrt()
            fused += (distances - mean) / torch.where(std > 0, std, torch.ones_like(std))
        fused /= len(channels)
        fused.masked_fill_(valid == 0, float("inf"))
        d, i = _smallest(fused, k)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d).cpu().numpy(), torch.cat(out_i).cpu().numpy()
