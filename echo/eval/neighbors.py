"""Exact k-nearest-neighbour search by chunked matrix products, on the encode device.

A (queries x bank) distance matrix is never held whole: the bank is visited in chunks and a running top-k is
merged, so memory stays bounded for banks of 10^6 x 7680. The search ranks by |q|^2 + |b|^2 - 2 q.b, on rows
scaled to unit length for cosine (|q - b|^2 = 2 (1 - cos) there), after centring both sides on a mean of bank
rows (translation leaves distances unchanged and removes most of the cancellation): fast, but off by up to ~E
ulps of (|q| + |b|)^2, which scrambles near-duplicates and leaves equal rows ~|q| sqrt(eps) apart. So each query's
best candidates, all those within that bound of the k-th, are measured again from the rows' differences:
accurate relative to the distance itself, exactly 0 between equal rows, never below 0. A query with more
candidates inside the bound than the search handed over is searched again for more. The search runs in
float64, which no precision setting of torch reaches: float32 products follow the user's TF32 or bf16 choice,
which rounds far past that bound, and that choice is the whole process's, so the search neither reads nor
changes it (set for the search, it held for every other thread's products too, and two searches at once could
give each other's back).
`backend="faiss"` uses faiss's exact flat index for the search instead, for banks that outgrow the device.

Features may come in any units: the search sees rows times a power of two that brings the largest value
below 1 (each cosine row times its own), so that no square overflows and none that matters underflows (tiny
rows made every search value 0, and each query searched again until it had the whole bank). The product is
exact for every value that stays a normal number, which all but those below ~2^-125 of the largest (faiss's
float32) do; one that turns subnormal is off by less than the smallest normal, which the bound allows for
(`_search_error`). The rows measured again are scaled alike, and Euclidean distances scaled back, exactly.

`fused_nearest` z-scores each query's distances over the whole bank: it visits the bank twice, in chunks, first
for each query's mean and std, then for the z-scores, keeping each query's candidates as it goes; these are
measured again in the same way, but the mean and std stay the search's (see there).

Among neighbours at exactly equal distance the lower bank index comes first.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import numpy as np
import torch

from ..inputs import checked_device, first_items, whole_number
from . import require

METRICS = ("euclidean", "cosine")
CHUNK_BYTES = 256 * 2**20  # one chunk of the distance matrix
BANK_CHUNK_ROWS = 65536
BANK_CHUNK_BYTES = 2**30  # one chunk of prepared (float64) bank rows: wide rows make it fewer than BANK_CHUNK_ROWS
EXTRA_CANDIDATES = 16  # beyond k, so that few queries need a second search to hold every candidate


def _refuse(bad, name: str, why: str) -> None:
    """Names the first rows of a (rows,) mask, if any."""
    bad = np.flatnonzero(bad.cpu().numpy() if isinstance(bad, torch.Tensor) else bad)
    if len(bad):
        raise ValueError(f"{name}: row(s) {first_items(bad)} {why}")


def check_finite(rows, name: str) -> None:
    """A NaN or infinite value would turn distances into NaN and neighbours into made-up indices (-1), or make
    one row the farthest of all: refused, naming the first rows that hold one. Tensors are checked where they
    are (a bank on the GPU is not copied). The extremes come first: a NaN makes both NaN, so finite ones clear
    every value with no mask of the rows' size (torch's isfinite also makes |rows|: +720 MB for a 430 MB bank)."""
    if isinstance(rows, torch.Tensor):
        if not rows.numel() or torch.isfinite(torch.stack(torch.aminmax(rows))).all():
            return
        finite = torch.isfinite(rows.flatten(1)).all(dim=1) if rows.dim() > 1 else torch.isfinite(rows)
    else:
        values = np.asarray(rows)
        if not values.size or np.isfinite(values.min()) and np.isfinite(values.max()):
            return
        finite = np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
    _refuse(~finite, name, "hold NaN or infinite values")


def check_nonzero(rows, name: str) -> None:
    """Cosine distance is undefined for a row of length 0 (all zero), which would tie with every row: refused,
    naming the first ones. A row too small to square in its dtype still has a direction, which the search
    sees scaled."""
    if isinstance(rows, torch.Tensor):
        nonzero = rows.flatten(1).any(dim=1)
    else:
        nonzero = np.reshape(rows, (len(rows), -1)).any(axis=1)
    _refuse(~nonzero, name, "have length 0: cosine distance is undefined for them")


def _array(embeddings, name: str) -> np.ndarray:
    """Embeddings as one array. Rows of different shapes (two models, or rates with other band counts) and
    missing rows (None: embed_files' entry for a file it could not read) are named here, not by numpy."""
    if isinstance(embeddings, (list, tuple)):
        missing = [i for i, row in enumerate(embeddings) if row is None]
        if missing:
            raise ValueError(f"{name}: row(s) {first_items(missing)} are None, not embeddings (files that could "
                             f"not be embedded?): leave them out")
    try:
        rows = np.asarray(embeddings)
    except ValueError:
        shapes = sorted({np.shape(row) for row in embeddings})
        raise ValueError(f"{name} differ in shape ({', '.join(map(str, shapes[:4]))}): one model and one sample "
                         f"rate (band count) per evaluation") from None
    if rows.dtype.kind not in "biuf":  # text failed in torch, complex numbers lost their imaginary part
        kind = "objects" if rows.dtype == object else rows.dtype
        raise ValueError(f"{name} must be real numbers of one shape, got {kind}")
    if not rows.dtype.isnative:  # big-endian rows (a file another machine wrote) failed in torch, naming neither side
        rows = rows.astype(rows.dtype.newbyteorder("="))
    return rows


def as_rows(embeddings, name: str = "embeddings") -> np.ndarray:
    """Embeddings as one array of finite rows; NaN or infinite values are named here rather than found as
    made-up neighbours."""
    rows = _array(embeddings, name)
    if len(rows) == 0:
        raise ValueError(f"no {name} to evaluate")
    check_finite(rows, name)
    return rows


def chosen_channels(channels, count: int) -> list[int]:
    """The channels asked for (all of them by default), each one of the data's `count`, once: a repeated one was
    fused as if it were two sensors and the view named after both."""
    if channels is None:
        return list(range(count))
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):  # channels=0 failed deep in Python
        raise ValueError(f"channels must be a list of channel numbers, e.g. [0, 2], got {channels!r}")
    channels = list(channels)
    numbers = [whole_number(c) for c in channels]  # [0.5] failed in numpy's indexing, [True] was channel 1
    if not numbers or None in numbers or not all(0 <= c < count for c in numbers) or len(set(numbers)) < len(numbers):
        raise ValueError(f"channels {channels} must be a non-empty subset of 0..{count - 1}, each channel once")
    return numbers


def _as_tensor(x, name: str, device) -> torch.Tensor:
    x = torch.as_tensor(x if isinstance(x, torch.Tensor) else _array(x, name))
    if x.is_complex():
        raise ValueError(f"{name} must be real numbers, got {x.dtype}")
    if not x.is_floating_point():
        x = x.double()
    check_finite(x, name)
    return x.to(device)


def _common_dtype(queries: torch.Tensor, bank: torch.Tensor) -> torch.dtype:
    """The dtype both sides are searched and returned in: the wider of theirs (the bank cast to the queries' one
    rounded float64 rows to float16 queries' resolution: distinct rows at distance 0, large ones infinite), float32
    for bfloat16, which numpy has no type for (the search ran, then its result could not be returned)."""
    dtype = torch.promote_types(queries.dtype, bank.dtype)
    return torch.float32 if dtype == torch.bfloat16 else dtype


def neighbour_count(k) -> int:
    """k as an int; 1.5 or True failed deep in torch ("argument 'size' failed to unpack")."""
    count = whole_number(k)
    if count is None:
        raise ValueError(f"k must be a whole number of neighbours, got {k!r}")
    return count


def _exclusions(exclude, queries: int, bank: int, device) -> torch.Tensor | None:
    """`exclude` as one bank row (or -1) per query. A value matching no row would be ignored, and 1.5 read as
    row 1: refused."""
    if exclude is None:
        return None
    values = np.asarray(exclude)
    if values.shape != (queries,):
        raise ValueError(f"exclude must hold one bank row (or -1) per query: {queries} values, "
                         f"got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"exclude must hold integers, got {values.dtype}")
    bad = np.flatnonzero((values < -1) | (values >= bank))
    if len(bad):
        raise ValueError(f"exclude: query {bad[0]} excludes row {values[bad[0]]}, which is neither -1 nor a row "
                         f"of the bank (0..{bank - 1})")
    return torch.as_tensor(values, dtype=torch.long, device=device)


def _group_codes(groups, queries: int, bank: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`groups` (query groups (Q,), bank groups (B,)), names or numbers, as integer codes on `device` shared by
    both sides; None without."""
    if groups is None:
        return None
    if len(groups) != 2:
        raise ValueError("groups must be a pair: (one group per query, one per bank row)")
    names = [np.asarray(side) for side in groups]
    if names[0].shape != (queries,) or names[1].shape != (bank,):
        raise ValueError(f"groups must hold one group per query ({queries}) and one per bank row ({bank}), got "
                         f"shapes {names[0].shape} and {names[1].shape}")
    try:
        codes = np.unique(np.concatenate(names), return_inverse=True)[1].reshape(-1)
    except TypeError:  # None among strings, say: no order to code them by
        raise ValueError(f"groups must be names or numbers of one kind, got {names[0].dtype} and "
                         f"{names[1].dtype}") from None
    codes = torch.as_tensor(codes, dtype=torch.long, device=device)
    return codes[:queries], codes[queries:]


def _check(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str, exclude, groups=None) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}")
    available = bank.shape[0] - (exclude is not None)
    if groups is not None:  # the bank less the largest group a query leaves out
        names, counts = torch.unique(groups[1], return_counts=True)
        left_out = counts[torch.isin(names, groups[0])]
        available = bank.shape[0] - (int(left_out.max()) if len(left_out) else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} neighbours asked of a bank of {bank.shape[0]} rows"
                         + (" (each query's own row excluded)" if exclude is not None else "")
                         + (f" ({available} outside the largest group a query leaves out)" if groups is not None
                            else ""))


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's sum of squares, without a temporary of the rows' size (a bank chunk's: up to a GB)."""
    return torch.einsum("ij,ij->i", rows, rows)


def _search_values(queries: torch.Tensor, bank: torch.Tensor, bank_sq=None) -> torch.Tensor:
    """(Q, B) squared distances of prepared rows, within `_search_error` of the exact ones."""
    queries_sq = _squared_norms(queries)[:, None]
    bank_sq = _squared_norms(bank) if bank_sq is None else bank_sq
    products = (queries @ bank.T).mul_(2)  # not (2 * queries) @ ...: a copy of the queries (820 MB, MAFAULDA-wide)
    return (queries_sq + bank_sq).sub_(products).clamp_min_(0)


def _search_error(search: torch.finfo, dim: int, sizes: torch.Tensor) -> torch.Tensor:
    """The most by which `_search_values` of prepared rows with |q| + |b| = sizes (S) can be off, in the search's
    dtype `search`: with u = eps / 2, the E-term products and sums and the centring are off by at most
    (E + 4) u S^2, taken as (E + 8) eps for margin. A value below the dtype's smallest normal (tiny) can be off
    by up to tiny rather than u of itself (flushed to 0 at worst): the products by 4 E tiny in all, and the rows
    (scaled, normalised, rounded to faiss's float32) by sqrt(E) tiny a step, which moves |q - b|^2 by at most
    12 sqrt(E) tiny S <= u S^2 + 36 E tiny (tiny < u); taken as 64 (E + 8) tiny."""
    return (dim + 8) * (search.eps * sizes ** 2 + 64 * search.tiny)


def _search_limit(metric: str, eps: float, search: torch.finfo, dim: int, query_norms: torch.Tensor,
                  kth: torch.Tensor) -> torch.Tensor:
    """The largest search value that a bank row as near as the k-th neighbour (exact distance `kth` between the
    rows as the search scales them, rounded by u = eps / 2) can get. With r the k-th's distance between prepared
    rows, |q| + |b| <= 2 |q| + r; cosine's norms, each off by at most (E / 2 + 1) u, move q - b by (E + 4) u:
    |q - b|^2 by (E + 8) eps |q - b|, with margin."""
    if metric == "euclidean":
        return kth * kth * (1 + 2 * eps) + _search_error(search, dim, 2 * query_norms + kth)
    apart = (2 * kth).sqrt()
    return apart * apart * (1 + 2 * eps) + _search_error(search, dim, 2 * query_norms + apart) + (
        (dim + 8) * eps * apart)


def _power_of_two(largest: torch.Tensor) -> torch.Tensor:
    """For each largest = m 2^e (1/2 <= m < 1), 2^-e (m / largest, exactly): rows of values up to `largest` times
    it lie below 1, every value exact but those that become subnormal (below 2^-125 or 2^-1021 of the largest in
    float32 or float64). Kept within the normal range: values all subnormal come out below 1/2, values past
    1 / (4 tiny) below 8."""
    tiny = torch.finfo(largest.dtype).tiny
    largest = largest.clamp(tiny, 1 / (4 * tiny))
    return torch.frexp(largest).mantissa / largest


def _scaled(rows: torch.Tensor, metric: str, scale: float, out=None) -> torch.Tensor:
    """Rows times `scale`, or for cosine each row (the last axis) times its own power of two (so that its norm
    neither overflows nor underflows): Euclidean distances come out times `scale`, cosine ones unchanged."""
    if metric == "cosine":
        scale = _power_of_two(torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True))
    return torch.mul(rows, scale, out=out)


def _exact_distances(queries: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, M) distances of query rows (Q, E) to their own candidate rows (Q, M, E), both as given, from their
    differences: relative to the distance, not to |q|, and exactly 0 between equal rows. Euclidean overwrites
    `candidates` with the differences: measuring holds one copy of the candidate rows, not two."""
    if metric == "euclidean":
        return torch.linalg.vector_norm(candidates.sub_(queries[:, None]), dim=2)
    apart = candidates - queries[:, None]
    # 1 - cos = |v|^2 / 2 with v = c/|c| - q/|q| = apart/|q| - s c, s = (|c| - |q|) / (|q| |c|), and
    # |c| - |q| = apart.(c + q) / (|c| + |q|): no difference of nearly equal numbers is rounded
    q_norm, c_norm = queries.norm(dim=1, keepdim=True), candidates.norm(dim=2)
    s = (torch.einsum("qme,qme->qm", apart, candidates) + torch.einsum("qme,qe->qm", apart, queries)) / (
        (c_norm + q_norm) * q_norm * c_norm)
    v = apart.div_(q_norm[..., None]).addcmul_(candidates, s[..., None], value=-1)  # in place: the big one
    return torch.einsum("qme,qme->qm", v, v) / 2


def _measured(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, metric: str,
              chunk_bytes: int, scale: float) -> torch.Tensor:
    """`_exact_distances` (Q, M) of query rows (Q, E) to their candidate bank rows (Q, M), both `_scaled`, in
    float64 (float32 sums of E terms keep ~sqrt(E) ulps), a chunk of queries at a time. Cosine rows are scaled
    whatever their dtype: rows 1e10 times longer than their query left it terms ~|b| / |q| that cancel, and 1 - cos
    came out as 8e6."""
    wanted, features = candidates.shape[1], bank.shape[1]
    query_rows = min(len(candidates), max(1, chunk_bytes // (wanted * features * 8)))
    # buffers filled again for each chunk of queries: new ones every time faulted in ~27 GB of fresh pages in a
    # MAFAULDA-wide leave-one-out, and the query rows' ones (tens of MB, under glibc's mmap threshold once it
    # has risen) were split by the small results between them, so the heap grew by their size at every chunk
    query_buffer = torch.empty((query_rows, features), dtype=torch.float64, device=candidates.device)
    candidate_buffer = torch.empty((query_rows, wanted, features), dtype=torch.float64, device=candidates.device)
    # a float64 bank where the measuring is: gathered straight into the candidates' buffer, not copied on
    direct = bank.dtype == torch.float64 and bank.device == candidates.device
    gathered = candidate_buffer.view(-1, features) if direct else torch.empty(
        (query_rows * wanted, features), dtype=bank.dtype, device=bank.device)
    measured = []
    for q0, rows in zip(range(0, len(candidates), query_rows), candidates.split(query_rows)):
        q_rows, c_rows = query_buffer[:len(rows)], candidate_buffer[:len(rows)]
        q_rows.copy_(queries[q0:q0 + len(rows)])
        picked = torch.index_select(bank, 0, rows.flatten().to(bank.device), out=gathered[:rows.numel()])
        if not direct:
            c_rows.view(-1, features).copy_(picked)  # scaled (and measured) in place
        _scaled(q_rows, metric, scale, out=q_rows)
        _scaled(c_rows, metric, scale, out=c_rows)
        measured.append(_exact_distances(q_rows, c_rows, metric))
    return torch.cat(measured)


def _best(distances: torch.Tensor, candidates: torch.Tensor, k: int, exclude,
          own=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest distances (Q, M) of each query to its candidates (Q, M, ascending bank rows) and their bank
    rows, never the query's excluded one nor one of its own group (`own`: a (Q, M) mask). Equal distances in bank
    order: torch.topk picks among them in any order, which could flip a tied kNN vote."""
    if exclude is not None:
        distances = distances.masked_fill(candidates == exclude[:, None], float("inf"))
    if own is not None:
        distances = distances.masked_fill(own, float("inf"))
    values, columns = torch.topk(distances, k, dim=1, largest=False, sorted=True)
    crowded = (distances <= values[:, -1:]).sum(1) > k  # more columns at the last value than places left
    if crowded.any():  # rare outside duplicated or quantised embeddings: sort those rows whole
        rows = crowded.nonzero().flatten()
        order = torch.sort(distances[rows], dim=1, stable=True).indices[:, :k]
        values[rows], columns[rows] = distances[rows].gather(1, order), order
    columns, by_column = columns.sort(dim=1)
    values, by_value = values.gather(1, by_column).sort(dim=1, stable=True)
    return values, candidates.gather(1, columns.gather(1, by_value))


def _bank_chunk_rows(bank_rows: int, features: int) -> int:
    """Bank rows searched at once: BANK_CHUNK_ROWS, fewer where their prepared float64 values would pass
    BANK_CHUNK_BYTES (65,536 rows of MAFAULDA's 53,760 features were 28 GB), and no more than the bank has."""
    return max(1, min(bank_rows, BANK_CHUNK_ROWS, BANK_CHUNK_BYTES // (8 * features)))


def _preparer(bank: torch.Tensor, metric: str, device, dtype: torch.dtype, scale: float, chunk_rows: int):
    """The map applied to query and bank rows (on `device`) before `_search_values`, into the search's dtype:
    `_scaled` (cosine rows then to unit length), less a centre, the mean of the prepared rows of one chunk's
    worth (`chunk_rows`) of bank rows spread over the bank. Any centre leaves distances as they are; a central
    one removes most of the cancellation, which a chunk's does as well as the whole bank's, for the price of one
    chunk. Rows are converted once and scaled in place: one copy of them at a time."""
    def scaled(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(dtype, copy=True)
        _scaled(rows, metric, scale, out=rows)
        return rows if metric == "euclidean" else rows.div_(rows.norm(dim=1, keepdim=True))
    step = -(-bank.shape[0] // chunk_rows)  # one chunk's rows at most
    centre = scaled(bank[::step].to(device)).mean(0, keepdim=True)
    return lambda rows: scaled(rows).sub_(centre)


def _largest(rows: torch.Tensor, dim=None) -> torch.Tensor:
    """The largest magnitude of the rows' values (over `dim`), on the CPU."""
    return torch.linalg.vector_norm(rows, float("inf"), dim=dim).cpu()


def nearest(queries, bank, k: int = 1, metric: str = "euclidean", exclude=None, device=None,
            backend: str = "torch", chunk_bytes: int = CHUNK_BYTES, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(distances (Q, k), bank indices (Q, k)), ascending per row. `metric`: "euclidean" or "cosine" (1 - cos,
    the anomaly score: `nearest(test, normal_bank, 1, "cosine")[0][:, 0]` scores clips as `echo eval` does).

    `exclude`: for each query, one bank row it may not match (its own row in leave-one-out), or -1.
    `groups`: (one group per query, one per bank row; names or numbers): a query never matches a bank row of its group
    (leave-one-group-out in one search, the bank prepared once; torch search only).
    `device`: where the search runs (the CPU by default); the bank stays on the CPU and goes there a chunk at a
    time. `backend`: "torch", or "faiss" (faiss-cpu: on the CPU whatever `device`). `chunk_bytes` bounds each
    block of the distance matrix.
    Searched in float64 (faiss: float32, which torch's settings do not reach either), the k nearest measured in
    float64 and returned (and ranked) in the wider of the inputs' dtypes (float32 for bfloat16): refused if they
    exceed its range. Distances come as a numpy array of that dtype, indices as an int64 one.
    """
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown search backend {backend!r}; known: torch, faiss")
    device = torch.device("cpu") if backend == "faiss" else checked_device(device or "cpu")
    queries = _as_tensor(queries, "queries", device)
    bank = _as_tensor(bank, "bank", "cpu")
    dtype = _common_dtype(queries, bank)
    queries, bank = queries.to(dtype), bank.to(dtype)
    k = neighbour_count(k)
    for name, rows in (("queries", queries), ("bank", bank)):
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (rows, features) matrix, got shape {tuple(rows.shape)}")
    exclude = _exclusions(exclude, queries.shape[0], bank.shape[0], device)
    groups = _group_codes(groups, queries.shape[0], bank.shape[0], device)
    if groups is not None and (exclude is not None or backend != "torch"):
        raise ValueError("groups: with the torch search only, and without exclude")
    _check(queries, bank, k, metric, exclude, groups)
    if metric == "cosine":
        check_nonzero(queries, "queries")
        check_nonzero(bank, "bank")
    search_dtype = torch.float64 if backend == "torch" else torch.promote_types(queries.dtype, torch.float32)
    scale = 1.0  # cosine rows are scaled each by its own
    if metric == "euclidean":
        scale = _power_of_two(torch.maximum(_largest(queries), _largest(bank)).to(search_dtype)).item()
    chunk_rows = _bank_chunk_rows(bank.shape[0], bank.shape[1])
    prepare = _preparer(bank, metric, device, search_dtype, scale, chunk_rows)
    prepared = prepare(queries)
    if backend == "faiss":
        search, release = partial(_search_faiss, index=_faiss_index(prepare(bank))), None
    else:
        chunk = _last_held(partial(_prepared_chunk, bank, prepare, device, chunk_rows))
        search = partial(_search_torch, chunk=chunk, bank_size=bank.shape[0], chunk_rows=chunk_rows,
                         chunk_bytes=chunk_bytes)
        release = chunk.release
    eps = torch.finfo(queries.dtype).eps
    search_finfo = torch.finfo(torch.float32 if backend == "faiss" else search_dtype)
    best_d = torch.empty((queries.shape[0], k), dtype=queries.dtype, device=device)
    best_i = torch.empty((queries.shape[0], k), dtype=torch.long, device=device)
    pending = torch.arange(queries.shape[0], device=device)
    wanted = k + (exclude is not None) + EXTRA_CANDIDATES
    while len(pending):
        wanted = min(wanted, bank.shape[0])
        own_groups = {} if groups is None else {"groups": (groups[0][pending], groups[1])}
        searched = prepared if len(pending) == len(prepared) else prepared[pending]  # the first: not a copy
        candidates, reach = search(searched, wanted=wanted, **own_groups)
        candidates = candidates.sort(dim=1).values
        if release:  # the bank chunk, not held while the candidates are measured: a second round prepares it again
            release()
        asked = queries if len(pending) == len(queries) else queries[pending]
        distances = _measured(asked, bank, candidates, metric, chunk_bytes, scale) / scale
        own = None if groups is None else groups[1][candidates] == groups[0][pending, None]
        d, i = _best(distances.to(queries.dtype), candidates, k, None if exclude is None else exclude[pending], own)
        if torch.isinf(d).any():
            advice = "scale the rows down" if queries.dtype == torch.float64 else "pass the rows in a wider dtype"
            raise ValueError(f"distances between queries and bank exceed {str(queries.dtype)[6:]}'s range: "
                             f"{advice}")
        best_d[pending], best_i[pending] = d, i
        # every other row's search value is at least reach: above the limit, none can be as near as the k-th
        limit = _search_limit(metric, eps, search_finfo, bank.shape[1], searched.norm(dim=1),
                              d[:, -1].to(search_dtype) * scale)
        settled = (reach > limit) | (wanted == bank.shape[0])
        pending = pending[~settled]
        wanted *= 4
    return best_d.cpu().numpy(), best_i.cpu().numpy()


def _prepared_chunk(bank: torch.Tensor, prepare, device, chunk_rows: int, b0: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The prepared bank rows from b0 on, `chunk_rows` of them, and their squared norms."""
    rows = prepare(bank[b0:b0 + chunk_rows].to(device))
    return rows, _squared_norms(rows)


def _last_held(prepare_chunk):
    """prepare_chunk(b0), remembered for the last b0 only: a bank of one chunk is prepared once, and a chunk is let
    go before the next is prepared (lru_cache held both: 1.5x a chunk, up to a GB more). chunk.release() lets go
    of the last one."""
    held = {}

    def chunk(b0: int):
        if b0 not in held:
            held.clear()
            held[b0] = prepare_chunk(b0)
        return held[b0]
    chunk.release = held.clear
    return chunk


def _search_torch(queries: torch.Tensor, chunk, bank_size: int, chunk_rows: int, wanted: int, chunk_bytes: int,
                  groups=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prepared query's `wanted` bank rows of smallest search value (Q, wanted), in any order, and the
    largest of those values (Q,). chunk(b0): as `_prepared_chunk`. `groups` (the queries' (Q,), the bank's (B,)):
    rows of a query's own group come after every other row, at the dtype's largest value (a row still, never the
    fill), so that one among the wanted makes the largest value exceed any limit: every other row is in."""
    best_v = torch.full((queries.shape[0], wanted), float("inf"), dtype=queries.dtype, device=queries.device)
    best_i = torch.zeros((queries.shape[0], wanted), dtype=torch.long, device=queries.device)
    query_rows = max(1, chunk_bytes // (chunk_rows * queries.element_size()))
    for b0 in range(0, bank_size, chunk_rows):
        rows_b, rows_sq = chunk(b0)
        take = min(wanted, rows_b.shape[0])
        for q0 in range(0, queries.shape[0], query_rows):
            rows = slice(q0, q0 + query_rows)
            values = _search_values(queries[rows], rows_b, rows_sq)
            if groups is not None:
                values.masked_fill_(_same_group(groups, rows, b0, chunk_rows), torch.finfo(values.dtype).max)
            chunk_v, chunk_i = torch.topk(values, take, dim=1, largest=False, sorted=False)
            merged_v = torch.cat([best_v[rows], chunk_v], dim=1)
            merged_i = torch.cat([best_i[rows], chunk_i + b0], dim=1)
            best_v[rows], order = torch.topk(merged_v, wanted, dim=1, largest=False, sorted=False)
            best_i[rows] = merged_i.gather(1, order)
        del rows_b, rows_sq  # not held while the next chunk is prepared
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


def _merged(moments: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Running (count, mean, sum of squared deviations) (3, Q) of each query's distances, in float64, merged with
    those of a further chunk (Q, B) (NaN: left out), taken in two passes over it, by Chan, Golub and LeVeque's
    update: as accurate as two passes over the whole row."""
    count = distances.shape[1] - distances.isnan().sum(1)
    mean = distances.nansum(1, keepdim=True) / count.clamp_min(1)[:, None]
    squares = (distances - mean).square_().nansum(1).double()
    total = moments[0] + count
    delta, weight = mean[:, 0].double() - moments[1], count / total.clamp_min(1)
    return torch.stack([total, moments[1] + delta * weight, moments[2] + squares + delta * delta * moments[0] * weight])


def _own(skip, b0: int, size: int):
    """(queries, columns) of the queries' excluded rows (skip: one per query, or -1) among the `size` bank rows
    from b0 on; None without exclusions."""
    if skip is None:
        return None
    inside = (skip >= b0) & (skip < b0 + size)
    return inside.nonzero().flatten(), skip[inside] - b0


def _same_group(groups, block: slice, b0: int, chunk_rows: int) -> torch.Tensor | None:
    """(queries of the block, bank rows of the chunk from b0 on) mask of the pairs in one group; None without."""
    if groups is None:
        return None
    return groups[0][block, None] == groups[1][None, b0:b0 + chunk_rows]


def _kept(kept, lower: torch.Tensor, upper: torch.Tensor, b0: int, k: int):
    """Each query's candidates (bank rows, their lower bounds) and its k smallest upper bounds so far (None before
    the first chunk), after the bounds (Q, B) of the chunk's rows from b0 on: every row whose lower bound is at
    most the k-th upper one (which only falls as chunks come) is kept, among as many rows of smallest lower
    bound as any query keeps."""
    rows = torch.arange(b0, b0 + lower.shape[1], device=lower.device).expand_as(lower)
    if kept is None:
        kept = rows[:, :0], lower[:, :0], torch.full_like(lower[:, :1], float("inf")).expand(-1, k)
    rows, lower, upper = (torch.cat(pair, 1) for pair in zip(kept, (rows, lower, upper)))
    upper = torch.topk(upper, k, dim=1, largest=False).values
    take = int((lower <= upper[:, -1:]).sum(1).max())
    lower, order = torch.topk(lower, take, dim=1, largest=False, sorted=False)
    return rows.gather(1, order), lower, upper


def fused_nearest(queries, bank, k: int, channels=None, exclude=None, device=None,
                  chunk_bytes: int = CHUNK_BYTES, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by the fused multi-channel distance: each (query, channel) row of Euclidean
    distances is z-scored over the bank (population std; a query's excluded row takes no part), then the
    chosen channels are averaged. queries (Q, C, E), bank (B, C, E) -> (fused distances, indices) (Q, k), numpy
    arrays, ascending per row. `channels`: the channel indices to fuse (all by default). `exclude`, `device`,
    `chunk_bytes`, `groups`: as `nearest`'s; a query's own group takes no part either, as if each group had its
    own bank.

    The bank stays on the CPU and is visited in chunks, twice: first for each query's mean and std per channel,
    merged chunk by chunk, then for the z-scores, keeping every row whose fused distance could be as small as
    the k-th's, by the search's bound on each distance. Those are measured again from the rows' differences and
    ranked in float64 (near-duplicates differ by far less than the inputs' dtype resolves around -mean/std),
    then returned in the wider of the inputs' dtypes (float32 for bfloat16). Each channel is searched (and
    measured) on its rows times its own power of two, which no z-score sees. The mean and std are taken over the search's distances, each off by
    up to sqrt((E + 8) eps) (|q| + |b|), though far less in practice: exact ones would measure every (query,
    bank) pair from its difference, which no matrix product does (torch.cdist that way takes ~10 times the
    search's time). A mean moves all of a query's fused distances alike, never its ranking; a std weighs its
    channel by its own small relative error. Device memory holds the queries and one chunk of the bank.
    """
    device = checked_device(device or "cpu")
    queries = _as_tensor(queries, "queries", device)
    bank = _as_tensor(bank, "bank", "cpu")
    dtype = _common_dtype(queries, bank)
    queries, bank = queries.to(dtype), bank.to(dtype)
    k = neighbour_count(k)
    if queries.dim() != 3 or bank.dim() != 3 or queries.shape[1:] != bank.shape[1:]:
        raise ValueError(f"fused search needs (rows, channels, features) for both sides with equal channels and "
                         f"features, got queries {tuple(queries.shape)} and bank {tuple(bank.shape)}")
    channels = chosen_channels(channels, bank.shape[1])
    exclude = _exclusions(exclude, queries.shape[0], bank.shape[0], device)
    groups = _group_codes(groups, queries.shape[0], bank.shape[0], device)
    if groups is not None and exclude is not None:
        raise ValueError("groups: without exclude")
    _check(queries[:, 0], bank[:, 0], k, "euclidean", exclude, groups)
    search_dtype = torch.float64  # as nearest's
    search = torch.finfo(search_dtype)
    largest = torch.maximum(_largest(queries, (0, 2)), _largest(bank, (0, 2)))[channels]
    scales = _power_of_two(largest.to(search_dtype)).tolist()
    chunk_rows = _bank_chunk_rows(bank.shape[0], len(channels) * bank.shape[2])
    preparers = [_preparer(bank[:, c], "euclidean", device, search_dtype, s, chunk_rows)
                 for c, s in zip(channels, scales)]
    prepared = [prepare(queries[:, c]) for c, prepare in zip(channels, preparers)]
    query_norms = [rows.norm(dim=1, keepdim=True) for rows in prepared]

    def prepared_chunk(b0: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = bank[b0:b0 + chunk_rows].to(device)  # every channel in one move
        return [_prepared_chunk(rows[:, c], prepare, device, chunk_rows, 0)
                for c, prepare in zip(channels, preparers)]
    chunk = _last_held(prepared_chunk)
    query_rows = max(1, chunk_bytes // (8 * chunk_rows * search_dtype.itemsize))
    blocks = [slice(q0, q0 + query_rows) for q0 in range(0, queries.shape[0], query_rows)]  # the most held at once
    skips = [None if exclude is None else exclude[block] for block in blocks]

    moments = torch.zeros((3, queries.shape[0], len(channels)), dtype=torch.float64, device=device)
    for b0 in range(0, bank.shape[0], chunk_rows):
        for block, skip in zip(blocks, skips):
            same = _same_group(groups, block, b0, chunk_rows)
            for j, (q, (b, b_sq)) in enumerate(zip(prepared, chunk(b0))):
                distances = _search_values(q[block], b, b_sq).sqrt_()
                own = _own(skip, b0, distances.shape[1])
                if own is not None:
                    distances[own] = float("nan")  # left out of the mean and std
                if same is not None:
                    distances.masked_fill_(same, float("nan"))
                moments[:, block, j] = _merged(moments[:, block, j], distances)
        del b, b_sq  # not held while the next chunk is prepared
    mean = moments[1].to(search_dtype)
    std = (moments[2] / moments[0]).sqrt_().to(search_dtype)
    std = torch.where(std > 0, std, 1)

    kept = [None] * len(blocks)
    for b0 in range(0, bank.shape[0], chunk_rows):
        for n, (block, skip) in enumerate(zip(blocks, skips)):
            same = _same_group(groups, block, b0, chunk_rows)
            fused = slack = 0
            for q, q_norm, (b, b_sq), mu, sigma in zip(prepared, query_norms, chunk(b0), mean[block].T, std[block].T):
                distances = _search_values(q[block], b, b_sq).sqrt_()
                mu, sigma = mu[:, None], sigma[:, None]
                fused = fused + (distances - mu) / sigma
                # a distance whose square is off by at most L is off by at most min(sqrt(L), L / distance); the
                # z-score and the sum over channels round by a few ulps of distance + mean
                error = _search_error(search, q.shape[1], q_norm[block] + b_sq.sqrt())
                slack = slack + (torch.fmin(error.sqrt(), error / distances)
                                 + len(channels) * search.eps * (distances + mu)) / sigma
            own = _own(skip, b0, fused.shape[1])
            if own is not None:
                fused[own], slack[own] = float("inf"), 0
            if same is not None:
                fused, slack = fused.masked_fill(same, float("inf")), slack.masked_fill(same, 0)
            kept[n] = _kept(kept[n], fused - slack, fused + slack, b0, k)
        del b, b_sq
    chunk.release()  # not held while the candidates are measured

    out_d, out_i = [], []
    for block, skip, (rows, _, _) in zip(blocks, skips, kept):
        candidates = rows.sort(dim=1).values
        exact = sum((_measured(queries[block, c], bank[:, c], candidates, "euclidean", chunk_bytes, s) - mu[:, None])
                    / sigma[:, None] for c, s, mu, sigma in zip(channels, scales, mean[block].T.double(),
                                                               std[block].T.double())) / len(channels)
        own = None if groups is None else groups[1][candidates] == groups[0][block, None]
        d, i = _best(exact, candidates, k, skip, own)
        out_d.append(d.to(queries.dtype))
        out_i.append(i)
    return torch.cat(out_d).cpu().numpy(), torch.cat(out_i).cpu().numpy()
