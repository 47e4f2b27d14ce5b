"""Exact kNN search against brute-force loops written here, on fresh random data and hand cases."""
import importlib.util

import numpy as np
import pytest
import torch

from echo.eval import neighbors

from conftest import seeded_rng


def brute_force(queries, bank, k, metric, exclude=None):
    distances, indices = [], []
    for q, query in enumerate(queries):
        if metric == "cosine":
            row = np.array([1 - query @ b / (np.linalg.norm(query) * np.linalg.norm(b)) for b in bank])
        else:
            row = np.array([np.sqrt(np.sum((query - b) ** 2)) for b in bank])
        if exclude is not None and exclude[q] >= 0:  # -1: none
            row[exclude[q]] = np.inf
        order = np.argsort(row, kind="stable")[:k]
        distances.append(row[order])
        indices.append(order)
    return np.array(distances), np.array(indices)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunked", [False, True])
def test_nearest_matches_brute_force(metric, chunked, monkeypatch):
    rng = seeded_rng()
    bank = rng.normal(size=(37, 12)) + 3.0  # an offset, so centring matters
    queries = rng.normal(size=(11, 12)) + 3.0
    kwargs = {}
    if chunked:  # several bank chunks and one query per chunk: exercises the running top-k merge
        monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 5)
        kwargs["chunk_bytes"] = 1
    distances, indices = neighbors.nearest(queries, bank, 4, metric, **kwargs)
    ref_d, ref_i = brute_force(queries, bank, 4, metric)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-9, atol=1e-9)


def test_nearest_excludes_own_row_and_float32_agrees():
    rng = seeded_rng()
    points = rng.normal(size=(25, 8))
    distances, indices = neighbors.nearest(points.astype(np.float32), points.astype(np.float32), 3,
                                           exclude=np.arange(25))
    ref_d, ref_i = brute_force(points, points, 3, "euclidean", exclude=np.arange(25))
    assert not np.any(indices == np.arange(25)[:, None])
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunked", [False, True])
def test_groups_leave_each_querys_own_group_out(metric, chunked, monkeypatch):
    """Leave-one-group-out in one search (faults searched each group apart, every search preparing nearly the
    whole bank again): a query never meets a row of its own group, ties (repeated integer rows, across groups and
    bank chunks; Euclidean) come in bank order, and a query whose group leaves fewer rows than the search first
    hands over (k + 16) still gets the k nearest of those, never a row twice; as brute force over the bank
    without the group."""
    if chunked:
        monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 7)
    rng = seeded_rng()
    points = rng.integers(1, 4, size=(60, 3)).astype(np.float64)  # 27 distinct rows: many exact ties
    if metric == "cosine":  # parallel rows ([1, 1, 1], [2, 2, 2]) round apart in brute force's 1 - cos
        points += 1e-3 * rng.normal(size=points.shape)
    groups = np.r_[rng.integers(1, 6, size=15), np.zeros(45, dtype=int)]  # 15 rows outside group 0, row 0 one
    for k in (4, 15):  # 15: every row outside group 0, for its queries
        distances, indices = neighbors.nearest(points, points, k, metric, groups=(groups, groups),
                                               chunk_bytes=1 if chunked else neighbors.CHUNK_BYTES)
        for q in range(len(points)):
            bank = np.flatnonzero(groups != groups[q])
            ref_d, ref_i = brute_force(points[q:q + 1], points[bank], k, metric)
            assert indices[q].tolist() == bank[ref_i[0]].tolist()
            np.testing.assert_allclose(distances[q], ref_d[0], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"k=16 neighbours asked of a bank of 60 rows \(15 outside the largest group"):
        neighbors.nearest(points, points, 16, metric, groups=(groups, groups))
    with pytest.raises(ValueError, match="groups: with the torch search only, and without exclude"):
        neighbors.nearest(points, points, 1, metric, exclude=np.arange(60), groups=(groups, groups))
    with pytest.raises(ValueError, match=r"one group per query \(60\) and one per bank row \(60\)"):
        neighbors.nearest(points, points, 1, metric, groups=(groups, groups[1:]))
    names = np.array([f"session {g}" for g in groups])  # names, coded alike on both sides: the same search
    _, by_name = neighbors.nearest(points[:20], points, 4, metric, groups=(names[:20], names))
    _, by_number = neighbors.nearest(points[:20], points, 4, metric, groups=(groups[:20], groups))
    assert by_name.tolist() == by_number.tolist()
    with pytest.raises(ValueError, match="groups must be names or numbers of one kind"):
        neighbors.nearest(points, points, 1, metric, groups=(names.astype(object), [None] * 60))


def test_hand_case_on_a_line():
    bank = np.array([[0.0], [1.0], [4.0], [10.0]])
    distances, indices = neighbors.nearest(np.array([[3.0], [9.0]]), bank, 2)
    assert indices.tolist() == [[2, 1], [3, 2]]
    np.testing.assert_allclose(distances, [[1.0, 2.0], [1.0, 5.0]])
    # cosine: [1, 1] is 45 degrees from [1, 0] and [0, 1], 0 degrees from [2, 2]
    distances, indices = neighbors.nearest(np.array([[1.0, 1.0]]), np.array([[1.0, 0], [0, 1.0], [2.0, 2.0]]),
                                           1, "cosine")
    assert indices.tolist() == [[2]] and abs(distances[0, 0]) < 1e-12


def naive_fused(queries, bank, k, channels, exclude=None):
    """Per query: per channel Euclidean row over the bank, z-scored with the population std, averaged."""
    out_d, out_i = [], []
    for q in range(len(queries)):
        keep = np.array([exclude is None or j != exclude[q] for j in range(len(bank))])
        fused = np.zeros(len(bank))
        for c in channels:
            row = np.array([np.linalg.norm(queries[q, c] - bank[j, c]) for j in range(len(bank))])
            fused += (row - row[keep].mean()) / row[keep].std()
        fused = fused / len(channels)
        fused[~keep] = np.inf
        order = np.argsort(fused, kind="stable")[:k]
        out_d.append(fused[order])
        out_i.append(order)
    return np.array(out_d), np.array(out_i)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_fused_matches_naive(leave_one_out):
    rng = seeded_rng()
    bank = rng.normal(size=(20, 4, 6)) * np.array([1, 10, 0.1, 3])[None, :, None]  # channels of unequal scale
    queries = bank if leave_one_out else rng.normal(size=(9, 4, 6))
    exclude = np.arange(20) if leave_one_out else None
    distances, indices = neighbors.fused_nearest(queries, bank, 5, [0, 1, 3], exclude, chunk_bytes=1)
    ref_d, ref_i = naive_fused(queries, bank, 5, [0, 1, 3], exclude)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunked", [False, True])
def test_fused_groups_leave_each_querys_own_group_out(chunked, monkeypatch):
    """Leave-one-group-out by the fused distance in one search (faults searched each group apart): a query's own
    group takes no part in its means and stds nor in its neighbours, as brute force over the bank without the
    group; across bank chunks too."""
    if chunked:
        monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 9)
    rng = seeded_rng()
    points = rng.normal(size=(40, 3, 5)) * np.array([1, 10, 0.1])[None, :, None]
    groups = rng.integers(0, 5, size=40)
    distances, indices = neighbors.fused_nearest(points, points, 4, [0, 2], groups=(groups, groups),
                                                 chunk_bytes=1 if chunked else neighbors.CHUNK_BYTES)
    for q in range(len(points)):
        bank = np.flatnonzero(groups != groups[q])
        ref_d, ref_i = naive_fused(points[q:q + 1], points[bank], 4, [0, 2])
        assert indices[q].tolist() == bank[ref_i[0]].tolist()
        np.testing.assert_allclose(distances[q], ref_d[0], rtol=1e-9, atol=1e-9)
    # a query of group 1 sees group 0's 35 equal rows at one distance: all are candidates for its block, and those
    # of group 0's queries (their own group) must still never be chosen
    tied = np.concatenate([np.repeat(points[:1], 35, 0), points[35:]])
    tied_groups = np.r_[np.zeros(35, dtype=int), np.ones(5, dtype=int)]
    _, indices = neighbors.fused_nearest(tied, tied, 4, groups=(tied_groups, tied_groups))
    assert (indices[:35] >= 35).all() and (indices[35:] < 35).all()
    largest = np.bincount(groups).max()
    with pytest.raises(ValueError, match=f"\\({40 - largest} outside the largest group a query leaves out\\)"):
        neighbors.fused_nearest(points, points, 41 - largest, groups=(groups, groups))
    with pytest.raises(ValueError, match="groups: without exclude"):
        neighbors.fused_nearest(points, points, 1, exclude=np.arange(40), groups=(groups, groups))


def test_fused_scale_invariance_by_hand():
    """z-scoring makes a channel's scale irrelevant: channel 1 = 1000 x channel 0 gives channel 0's ranking."""
    base = np.array([[0.0], [1.0], [3.0], [7.0]])
    bank = np.stack([base, 1000 * base], axis=1)  # (4, 2, 1)
    _, indices = neighbors.fused_nearest(np.array([[[2.6]], [[2600.0]]]).reshape(1, 2, 1), bank, 4)
    assert indices.tolist() == [[2, 1, 0, 3]]  # |2.6-3| < |2.6-1| < |2.6-0| < |2.6-7|


def test_bad_requests_are_clear():
    bank = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k=4 neighbours asked of a bank of 3 rows"):
        neighbors.nearest(np.zeros((1, 4)), bank, 4)
    with pytest.raises(ValueError, match="own row excluded"):
        neighbors.nearest(bank, bank, 3, exclude=np.arange(3))
    with pytest.raises(ValueError, match="queries have 5 features but the bank has 4"):
        neighbors.nearest(np.zeros((1, 5)), bank)
    with pytest.raises(ValueError, match="unknown metric"):
        neighbors.nearest(bank, bank, metric="manhattan")
    with pytest.raises(ValueError, match="channels"):
        neighbors.fused_nearest(np.zeros((1, 2, 3)), np.zeros((4, 2, 3)), 1, [2])
    with pytest.raises(ValueError, match=r"exclude must hold one bank row \(or -1\) per query: 3 values"):
        neighbors.nearest(bank, bank, 1, exclude=[0])  # was broadcast: row 0 excluded for every query
    for k in (1.5, True):  # failed deep in torch: "argument 'size' failed to unpack", "must be int, not bool"
        with pytest.raises(ValueError, match=f"k must be a whole number of neighbours, got {k}"):
            neighbors.nearest(bank, bank, k)
        with pytest.raises(ValueError, match=f"k must be a whole number of neighbours, got {k}"):
            neighbors.fused_nearest(bank[:, None], bank[:, None], k)
    assert neighbors.nearest(bank, bank, 2.0)[1].shape == (3, 2)
    # text failed in torch ("can't convert np.ndarray of type numpy.str_"); complex values lost their imaginary part
    with pytest.raises(ValueError, match="bank must be real numbers of one shape, got <U1"):
        neighbors.nearest(bank, [["a"] * 4])
    with pytest.raises(ValueError, match="queries must be real numbers of one shape, got complex128"):
        neighbors.nearest(bank + 1j, bank)
    with pytest.raises(ValueError, match="queries must be real numbers, got torch.complex64"):
        neighbors.nearest(torch.ones(1, 4, dtype=torch.complex64), bank)


@pytest.mark.parametrize("side", ["queries", "bank"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_rows_with_nan_or_inf_are_named_not_searched(side, value):
    """A NaN distance made up neighbour -1, and a NaN bank centre made every Euclidean neighbour -1."""
    rows = {"queries": np.ones((3, 4)), "bank": np.ones((5, 4))}
    rows[side][2, 1] = value
    with pytest.raises(ValueError, match=f"{side}: row\\(s\\) 2 hold NaN or infinite values"):
        neighbors.nearest(rows["queries"], rows["bank"], 1)
    with pytest.raises(ValueError, match=f"{side}: row\\(s\\) 2 hold NaN or infinite values"):
        neighbors.fused_nearest(rows["queries"][:, None], rows["bank"][:, None], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, None])
def test_every_non_finite_value_is_found_by_the_extremes_first(dtype, value):
    """The check reads the rows' min and max before any mask of their size: each kind of bad value, alone
    among finite ones, in tensors and arrays of each dtype, is still named by its rows."""
    rows = torch.randn(6, 5).to(dtype)
    if value is not None:
        rows[4, 3] = value
    for given in (rows, rows.float().numpy().astype(np.float16 if dtype == torch.float16 else np.float32)):
        if value is None:
            neighbors.check_finite(given, "bank")
        else:
            with pytest.raises(ValueError, match=r"bank: row\(s\) 4 hold NaN or infinite values"):
                neighbors.check_finite(given, "bank")


def test_big_endian_rows_are_searched_as_native_ones():
    """Rows read from a big-endian file ('>f4') failed in torch ("byte order different from the native byte
    order"), as the signals they came from are read."""
    rng = seeded_rng()
    queries, bank = rng.standard_normal((5, 8)), rng.standard_normal((9, 8))
    for metric in ("cosine", "euclidean"):
        expected = brute_force(queries.astype(np.float32), bank.astype(np.float32), 2, metric)
        distances, indices = neighbors.nearest(queries.astype(">f4"), bank.astype(">f4"), 2, metric)
        assert np.array_equal(indices, expected[1]) and np.allclose(distances, expected[0], atol=1e-5)


def test_missing_or_ragged_rows_are_named_not_numpys_error():
    """embed_files holds None for a file it could not read, and rates with other band counts give rows of other
    lengths: the search named neither (numpy's "inhomogeneous shape")."""
    with pytest.raises(ValueError, match=r"queries: row\(s\) 1 are None, not embeddings"):
        neighbors.nearest([np.ones(4), None], np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"bank differ in shape \(\(4,\), \(6,\)\)"):
        neighbors.nearest(np.ones((2, 4)), [np.ones(4), np.ones(6)])
    with pytest.raises(ValueError, match=r"embeddings: row\(s\) 0 are None"):
        neighbors.as_rows((None, np.ones(3)))


def test_a_bank_chunk_is_not_held_while_candidates_are_measured(monkeypatch):
    """The search's last bank chunk stayed held through the measuring of its candidates: a second copy of a bank
    of one chunk (820 MB at MAFAULDA's width) beside the measured rows."""
    import weakref

    chunks, alive_when_measured = [], []
    prepared_chunk, measured = neighbors._prepared_chunk, neighbors._measured

    def watching_chunk(*args):
        rows, squares = prepared_chunk(*args)
        chunks.append(weakref.ref(rows))
        return rows, squares

    def watching_measure(*args):
        alive_when_measured.append(sum(ref() is not None for ref in chunks))
        return measured(*args)

    monkeypatch.setattr(neighbors, "_prepared_chunk", watching_chunk)
    monkeypatch.setattr(neighbors, "_measured", watching_measure)
    rng = seeded_rng()
    bank = np.round(rng.normal(size=(300, 2)), 0)  # many equal rows: rounds beyond the first
    distances, indices = neighbors.nearest(bank[:40] + 0.25, bank, 3)
    assert len(chunks) >= 2 and alive_when_measured == [0] * len(alive_when_measured)
    np.testing.assert_array_equal(indices, brute_force(bank[:40] + 0.25, bank, 3, "euclidean")[1])
    chunks.clear(), alive_when_measured.clear()
    neighbors.fused_nearest(bank[:40, None] + 0.25, bank[:, None], 3)
    assert chunks and alive_when_measured == [0] * len(alive_when_measured)


def test_equal_distances_come_in_bank_order():
    """torch.topk leaves ties in any order; the module promises the lower bank index first among equal
    distances (and the fault vote breaks tied votes by that order). Integer points repeat: many exact ties."""
    rng = seeded_rng()
    bank = rng.integers(0, 10, size=(300, 2)).astype(np.float64)
    queries = rng.integers(0, 10, size=(40, 2)).astype(np.float64)
    distances, indices = neighbors.nearest(queries, bank, 7)
    tied = distances[:, 1:] == distances[:, :-1]
    assert tied.sum() > 20
    assert (indices[:, 1:] > indices[:, :-1])[tied].all()


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    rng = seeded_rng()
    bank = rng.normal(size=(50, 16)).astype(np.float32)
    for metric in ("euclidean", "cosine"):
        ref = neighbors.nearest(bank, bank, 3, metric, exclude=np.arange(50))
        got = neighbors.nearest(bank, bank, 3, metric, exclude=np.arange(50), backend="faiss")
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)


def test_faiss_ranks_in_the_inputs_precision():
    """Near-duplicate clips (1 - cos ~ 1e-4): faiss's float32 ranking only proposes candidates; distances and
    order are the float64 search's."""
    pytest.importorskip("faiss")
    rng = seeded_rng()
    centre = rng.normal(size=768)
    bank = centre + 0.01 * rng.normal(size=(300, 768))
    queries = centre + 0.01 * rng.normal(size=(40, 768))
    for metric in ("euclidean", "cosine"):
        ref = neighbors.nearest(queries, bank, 5, metric)
        got = neighbors.nearest(queries, bank, 5, metric, backend="faiss")
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-12)  # float32: ~1e-6
        ref = neighbors.nearest(bank, bank, 3, metric, exclude=np.arange(300))
        got = neighbors.nearest(bank, bank, 3, metric, exclude=np.arange(300), backend="faiss")
        np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("rows", [4, 8, 16, 33])
def test_equal_distances_at_the_last_place_go_to_the_lowest_index(rows):
    """Every bank row at the same distance: k=1 must be row 0 (torch.topk alone picked 2, 6, 10 or 22), in
    every chunking, in the fused search and through faiss."""
    bank = np.zeros((rows, 4))
    bank[:, 0] = 1.0
    queries = np.zeros((3, 4))
    for chunk_bytes in (8, neighbors.CHUNK_BYTES):
        distances, indices = neighbors.nearest(queries, bank, 2, chunk_bytes=chunk_bytes)
        assert (indices == [0, 1]).all() and (distances == 1).all()
    _, fused = neighbors.fused_nearest(np.stack([queries, queries], 1), np.stack([bank, bank], 1), 1)
    assert (fused == 0).all()
    if importlib.util.find_spec("faiss"):
        assert (neighbors.nearest(queries, bank, 1, backend="faiss")[1] == 0).all()


def with_duplicates(rng, rows: int, dim: int, dtype) -> tuple[np.ndarray, list[list[int]]]:
    """Random rows where some rows repeat at other places; also the groups of equal rows."""
    unique = rng.normal(size=(rows, dim)) + rng.normal(size=dim)  # a shared offset: cosines far from 0
    copies = rng.choice(rows, size=rows // 3, replace=False)
    bank = np.concatenate([unique, unique[copies], unique[copies[:2]]]).astype(dtype)
    order = rng.permutation(len(bank))
    bank, source = bank[order], np.concatenate([np.arange(rows), copies, copies[:2]])[order]
    groups = [np.flatnonzero(source == s).tolist() for s in range(rows)]
    return bank, [group for group in groups if len(group) > 1]


def exact_distances(queries, bank, metric):
    """Distances without cancellation, in extended precision (numpy's plain loops, not BLAS: equal rows give
    equal distances): from the rows' differences d = b - q, and for cosine by Lagrange's identity
    |q|^2 |b|^2 - (q.b)^2 = |q|^2 |d|^2 - (q.d)^2."""
    bank = bank.astype(np.longdouble)
    rows = []
    for q in queries.astype(np.longdouble):
        d = bank - q
        if metric == "euclidean":
            rows.append(np.sqrt((d * d).sum(1)))
        else:
            norms = np.sqrt(q @ q * (bank * bank).sum(1))
            rows.append((q @ q * (d * d).sum(1) - (d @ q) ** 2) / (norms * (norms + bank @ q)))
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [3, 64, 768])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_equal_rows_are_exactly_zero_and_never_negative(metric, backend, dtype, dim, monkeypatch):
    """1 - q.b of equal unit rows rounded to about +-1e-16 (+-1e-7 in float32), and |q|^2 + |b|^2 - 2 q.b to
    about 1e-12 (1e-3 in float32; 0.02 after the square root): a duplicate of a bank clip scored below 0 or
    above another duplicate, in either search, with or without the own row excluded."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 16)  # duplicates fall in different bank chunks
    rng = seeded_rng()
    bank, groups = with_duplicates(rng, 30, dim, dtype)
    queries = np.concatenate([bank, rng.normal(size=(5, dim)).astype(dtype)])
    k = 5
    distances, indices = neighbors.nearest(queries, bank, k, metric, backend=backend)
    ref_d = np.sort(exact_distances(queries, bank, metric), axis=1)[:, :k]
    assert (distances >= 0).all()
    np.testing.assert_allclose(distances, ref_d, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=0)
    for group in groups:
        for row in group:  # every copy first, at exactly 0 and in bank order; then only distances above 0
            assert indices[row, :len(group)].tolist() == group
            assert (distances[row, :len(group)] == 0).all() and (distances[row, len(group):] > 0).all()
    single = [row for row in range(len(bank)) if not any(row in group for group in groups)]
    assert (indices[single, 0] == single).all() and (distances[single, 0] == 0).all()
    assert (distances[single, 1:] > 0).all() and (distances[len(bank):] > 0).all()

    distances, indices = neighbors.nearest(bank, bank, 2, metric, exclude=np.arange(len(bank)), backend=backend)
    assert (distances >= 0).all() and not (indices == np.arange(len(bank))[:, None]).any()
    for group in groups:
        for row in group:
            assert indices[row, 0] == [other for other in group if other != row][0] and distances[row, 0] == 0
    assert (distances[single] > 0).all()


def near_duplicates(dtype, others: int, dim: int = 768) -> tuple[np.ndarray, np.ndarray]:
    """(bank, fresh queries): 60 rows with a shared offset (centring matters), 4 exact copies, 40 copies of one
    row and 3 of another 1e-6 apart (relative), shuffled; queries near rows 0 and 2, and `others` unrelated."""
    rng = seeded_rng()
    unique = rng.normal(size=(60, dim)) + rng.normal(size=dim)
    near = lambda row, count: row * (1 + 1e-6 * rng.normal(size=(count, dim)))  # noqa: E731
    bank = np.concatenate([unique, unique[:4], near(unique[0], 40), near(unique[1], 3)]).astype(dtype)
    fresh = np.concatenate([near(unique[0], 2), near(unique[2], 2), rng.normal(size=(others, dim))])
    return bank[rng.permutation(len(bank))], fresh.astype(dtype)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_near_duplicates_match_exact_float64_distances(metric, dtype, backend, monkeypatch):
    """Rows 1e-6 apart (relative) lie far inside the rounding of |q|^2 + |b|^2 - 2 q.b and 1 - q.b, which put
    them in random order and at distances off by up to |q| sqrt(eps): the k nearest must be the nearest and
    measure as float64 differences do, to the dtype's precision, also for a row with 40 near copies, more
    than the search first hands over. (Seen from afar the 40 lie 1e-8 apart: float32 cannot order them.)"""
    if backend == "faiss":
        pytest.importorskip("faiss")
    monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 32)  # near copies fall in different bank chunks
    k = 5
    bank, fresh = near_duplicates(dtype, others=3)
    queries = np.concatenate([bank, fresh])
    exclude = np.concatenate([np.arange(len(bank)), np.full(len(fresh), -1)])  # leave-one-out for bank rows
    distances, indices = neighbors.nearest(queries, bank, k, metric, exclude=exclude, backend=backend)
    reference = exact_distances(queries, bank, metric)
    reference[np.arange(len(bank)), np.arange(len(bank))] = np.inf
    chosen = np.take_along_axis(reference, indices, 1)
    rtol = 1e-6 if dtype == np.float32 else 1e-12  # float32: 8 ulps
    np.testing.assert_allclose(distances, chosen, rtol=rtol, atol=0)
    np.testing.assert_allclose(chosen, np.sort(reference, axis=1)[:, :k], rtol=rtol, atol=0)
    if dtype == np.float64:
        np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_ranks_equal_and_near_duplicate_rows_exactly(dtype):
    """The fused search measured every distance as |q|^2 + |b|^2 - 2 q.b: equal rows came out ~|q| sqrt(eps)
    apart and rows 1e-6 apart (relative) in random order. Channel c here is the base rows times a power of 2
    (exact in any dtype), so each channel's z-score is a positive multiple of the base distance less a constant,
    whatever the bank's mean and std: the fused ranking must be the exact ranking of base distances, equal rows
    at equal fused distances in bank order, including a row with 40 near copies."""
    k = 5
    base, fresh = near_duplicates(dtype, others=0)
    scales = np.array([1, 8, 0.25], dtype=dtype)[None, :, None]
    queries = np.concatenate([base, fresh])
    exclude = np.concatenate([np.arange(len(base)), np.full(len(fresh), -1)])  # leave-one-out for bank rows
    distances, indices = neighbors.fused_nearest(queries[:, None] * scales, base[:, None] * scales, k,
                                                 exclude=exclude, chunk_bytes=2**16)  # several chunks
    reference = exact_distances(queries, base, "euclidean")
    reference[np.arange(len(base)), np.arange(len(base))] = np.inf
    np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable")[:, :k])
    chosen = np.take_along_axis(reference, indices, 1)
    tied = chosen[:, 1:] == chosen[:, :-1]
    assert tied.sum() >= 4 and (distances[:, 1:] == distances[:, :-1])[tied].all()
    assert (distances[:, 1:] >= distances[:, :-1]).all()


def test_exclusions_outside_the_bank_are_refused():
    """An exclude value below -1 or past the bank's last row matched no row and was silently ignored (a query
    then met its own row), and 1.5 was read as row 1."""
    bank = np.arange(12.0).reshape(3, 4)
    for value in (3, -2):
        message = rf"exclude: query 1 excludes row {value}, which is neither -1 nor a row of the bank \(0\.\.2\)"
        with pytest.raises(ValueError, match=message):
            neighbors.nearest(bank, bank, 1, exclude=[0, value, 5])
        with pytest.raises(ValueError, match=message):
            neighbors.fused_nearest(bank[:, None], bank[:, None], 1, exclude=[0, value, 5])
    with pytest.raises(ValueError, match="exclude must hold integers, got float64"):
        neighbors.nearest(bank, bank, 1, exclude=[0, 1.5, 2])


PER_BACKEND = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9


@pytest.fixture
def matmul_precision_restored():
    yield
    torch.set_float32_matmul_precision("highest")
    if PER_BACKEND:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def precision_settings():
    """Torch's process-wide settings of float32 products' precision, as it reports them (per backend from torch
    2.9 on, where the one-setting getter raises once both ways of setting were used)."""
    if PER_BACKEND:
        return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                torch.backends.mkldnn.matmul.fp32_precision)
    return torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32


USER_PRECISIONS = {  # the ways a user can lower float32 products' precision for the whole process
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "medium": lambda: torch.set_float32_matmul_precision("medium"),  # bf16 products on a CPU with bf16 (oneDNN)
    "high": lambda: torch.set_float32_matmul_precision("high"),
    "fp32_precision": lambda: (setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                               setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")),
}


def near_ties(rng, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(queries, bank) in float32: each query has 40 bank rows 0.5 (1 + j 1e-4) from it (j = 0..39, shuffled),
    more than the search first hands over, off at right angles, so that their cosine distances come in the same
    order; and 40 other rows."""
    queries = rng.normal(size=(5, dim)) + 1.0
    away = rng.normal(size=(5, 40, dim))
    away -= (away @ queries[:, :, None]) / (queries * queries).sum(1)[:, None, None] * queries[:, None]
    away /= np.linalg.norm(away, axis=2, keepdims=True)
    ties = queries[:, None] + 0.5 * (1 + 1e-4 * rng.permutation(40))[:, None] * away
    bank = np.concatenate([ties.reshape(-1, dim), rng.normal(size=(40, dim)) + 1.0])
    return queries.astype(np.float32), bank[rng.permutation(len(bank))].astype(np.float32)


def bf16_nearest(queries, bank, k: int, metric: str) -> np.ndarray:
    """The k nearest by |q|^2 + |b|^2 - 2 q.b with q.b taken of the rows (unit rows for cosine) rounded to bf16."""
    q, b = (torch.from_numpy(rows).double() for rows in (queries, bank))
    if metric == "cosine":
        q, b = q / q.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    values = (q * q).sum(1, keepdim=True) + (b * b).sum(1) - 2 * q.bfloat16().double() @ b.bfloat16().double().T
    return np.argsort(values.numpy(), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("setting", [name for name in USER_PRECISIONS if PER_BACKEND or name != "fp32_precision"])
def test_searches_neither_change_nor_follow_the_users_matmul_precision(setting, monkeypatch,
                                                                       matmul_precision_restored):
    """TF32 (GPU) and bf16 (oneDNN on CPUs) float32 products, the user's choice for the whole process, round to
    10 or 7 bits, far past the search's bound: a neighbour could be missed. The searches set full float32 for
    their duration, which held for every other thread's products too, and two searches at once could give each
    other's setting back, leaving it changed. The setting is now left as the user made it, inside the searches
    too, and both find the neighbours of exact float64 distances among near ties that products of rows
    rounded to bf16 put in another order (a search by float32 products under "medium" missed some of them on
    a CPU with bf16, and z-scored by means and stds off by 0.5 %)."""
    queries, bank = near_ties(seeded_rng())
    reference = {metric: brute_force(queries.astype(np.float64), bank.astype(np.float64), 6, metric)
                 for metric in ("euclidean", "cosine")}
    for metric, (_, indices) in reference.items():
        assert (bf16_nearest(queries, bank, 6, metric) != indices).any()
    USER_PRECISIONS[setting]()
    before = precision_settings()
    seen = []
    search_values = neighbors._search_values
    monkeypatch.setattr(neighbors, "_search_values", lambda *args: seen.append(precision_settings())
                        or search_values(*args))
    for metric, (ref_d, ref_i) in reference.items():
        distances, indices = neighbors.nearest(queries, bank, 6, metric)
        np.testing.assert_array_equal(indices, ref_i)
        np.testing.assert_allclose(distances, ref_d, rtol=1e-6, atol=1e-7)
    # channel 1 is channel 0 times 4: the same z-scores, so the fused ranking is channel 0's distances'
    channels = lambda rows: np.stack([rows, 4 * rows], 1)  # noqa: E731
    distances, indices = neighbors.fused_nearest(channels(queries), channels(bank), 6)
    np.testing.assert_array_equal(indices, reference["euclidean"][1])
    ref_d, _ = fused_reference(channels(queries).astype(np.float64), channels(bank).astype(np.float64), 6,
                               np.full(len(queries), -1))
    np.testing.assert_allclose(distances, ref_d, rtol=1e-5, atol=1e-6)
    assert seen and set(seen) == {before} and precision_settings() == before


def test_cosine_refuses_zero_rows_and_measures_tiny_ones():
    """A zero row has no direction: it tied with every row, each query re-ranked against the whole bank.
    A row of length 1e-14 was scaled by 1e12 (a floor on norms), so the search put it ~1 from everything
    and a query missed the row of its own direction; a float32 row of 1e-30, whose squares underflow, was
    refused as length 0."""
    rng = seeded_rng()
    queries = rng.normal(size=(3, 8))
    bank = queries[0] + 0.2 * rng.normal(size=(60, 8))  # all near query 0's direction
    zeroed = queries.copy()
    zeroed[1] = 0
    with pytest.raises(ValueError, match=r"queries: row\(s\) 1 have length 0: cosine distance is undefined"):
        neighbors.nearest(zeroed, bank, 1, "cosine")
    zeroed = bank.copy()
    zeroed[[5, 9]] = 0
    with pytest.raises(ValueError, match=r"bank: row\(s\) 5, 9 have length 0"):
        neighbors.nearest(queries, zeroed, 1, "cosine")
    np.testing.assert_array_equal(neighbors.nearest(queries, zeroed, 3)[1],  # Euclidean: zero rows are points
                                  brute_force(queries, zeroed, 3, "euclidean")[1])
    bank[7] = queries[0] * 1e-14
    distances, indices = neighbors.nearest(queries, bank, 3, "cosine")
    ref_d, ref_i = brute_force(queries, bank, 3, "cosine")
    assert ref_i[0, 0] == 7
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-9, atol=1e-15)
    bank = bank.astype(np.float32)
    bank[7] = queries[0] * 1e-30
    distances, indices = neighbors.nearest(queries.astype(np.float32), bank, 3, "cosine")
    ref_d, ref_i = brute_force(queries.astype(np.float32).astype(np.float64), bank.astype(np.float64), 3, "cosine")
    assert ref_i[0, 0] == 7
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-6, atol=1e-7)


def rounded_reference(queries, bank, k, metric):
    """float64 distances rounded to the inputs' dtype, ranked there (equal ones in bank order), as `nearest`."""
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    if metric == "cosine":
        unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
        distances = 1 - unit(q) @ unit(b).T
    else:
        distances = np.linalg.norm(q[:, None] - b[None], axis=2)
    distances = distances.astype(queries.dtype)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), order


# values whose squared norms (16 features) overflow the dtype, their distances well inside it
OVERFLOWING = [(np.float16, 300.0), (np.float32, 1e20)]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype, scale", OVERFLOWING)
def test_values_whose_squares_overflow_the_dtype_are_searched_right(dtype, scale, metric):
    """Squared norms past the dtype's range made search values inf or NaN, which the finiteness check did not
    see: made-up neighbours and distances."""
    rng = seeded_rng()
    bank = (rng.normal(size=(40, 16)) * scale).astype(dtype)
    queries = (rng.normal(size=(7, 16)) * scale).astype(dtype)
    distances, indices = neighbors.nearest(queries, bank, 3, metric)
    ref_d, ref_i = rounded_reference(queries, bank, 3, metric)
    assert distances.dtype == dtype
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_array_equal(distances, ref_d)


@pytest.mark.parametrize("dtype, scale", OVERFLOWING)
def test_fused_values_whose_squares_overflow_the_dtype_are_searched_right(dtype, scale):
    rng = seeded_rng()
    bank = (rng.normal(size=(30, 2, 16)) * scale).astype(dtype)
    queries = (rng.normal(size=(5, 2, 16)) * scale).astype(dtype)
    distances, indices = neighbors.fused_nearest(queries, bank, 3)
    ref_d, ref_i = naive_fused(queries.astype(np.float64), bank.astype(np.float64), 3, [0, 1])
    np.testing.assert_array_equal(indices, ref_i)
    # the mean and std are the search's, in float32 (at least) as for rows near 1: a few float32 ulps of mean/std
    tol = max(np.finfo(dtype).eps, 2.0 ** -20)
    np.testing.assert_allclose(distances, ref_d, rtol=8 * tol, atol=8 * tol)


def test_distances_past_the_dtype_are_refused():
    """A float16 distance past 65504 came back inf; so would a float64 one past ~1.8e308, whose rows have no wider
    dtype."""
    queries, bank = np.array([[4e4]], np.float16), np.array([[-4e4], [0.0]], np.float16)
    distances, indices = neighbors.nearest(queries, bank, 1)
    assert indices.tolist() == [[1]] and distances.tolist() == [[4e4]]
    with pytest.raises(ValueError, match="distances between queries and bank exceed float16's range: pass the "
                                         "rows in a wider dtype"):
        neighbors.nearest(queries, bank, 2)
    queries, bank = np.array([[1.5e308]]), np.array([[-1.5e308], [0.0]])
    distances, indices = neighbors.nearest(queries, bank, 1)
    assert indices.tolist() == [[1]] and distances.tolist() == [[1.5e308]]
    with pytest.raises(ValueError, match="exceed float64's range: scale the rows down"):
        neighbors.nearest(queries, bank, 2)


def test_sides_of_two_dtypes_are_searched_and_returned_in_the_wider_one():
    """A float64 bank was cast to float16 queries' dtype: rows 1e-4 apart became one row, at distance 0, and one of
    7e4 infinite; a bfloat16 pair was searched, then failed in numpy ("unsupported ScalarType BFloat16")."""
    queries = np.array([[1.0, 0.0]], np.float16)
    bank = np.array([[1.0002, 0.0], [0.9999, 0.0], [7e4, 0.0]])
    for given in ((queries, bank), (bank[:2].astype(np.float16), queries.astype(np.float64))):
        assert neighbors.nearest(*given, 1)[0].dtype == np.float64
    distances, indices = neighbors.nearest(queries, bank, 3)
    assert indices.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(distances, [[1e-4, 2e-4, 7e4 - 1]], rtol=1e-9)
    distances, indices = neighbors.fused_nearest(queries[:, None], bank[:, None], 1)
    assert indices.tolist() == [[1]] and distances.dtype == np.float64
    distances, indices = neighbors.nearest(torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16),
                                           torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=torch.bfloat16), 2)
    assert distances.dtype == np.float32 and distances.tolist() == [[1.0, 2.0]] and indices.tolist() == [[0, 1]]


# rows times these powers of two: squares that underflow to 0 or overflow, in float32 and in float64
UNITS = [(np.float32, 2.0 ** -80), (np.float32, 2.0 ** 100), (np.float64, 2.0 ** -600), (np.float64, 2.0 ** 600)]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype, factor", UNITS)
def test_rows_in_any_units_are_searched_as_rows_near_1(dtype, factor, metric, monkeypatch):
    """float32 values near 1e-24 (features in odd units) made every square underflow: every search value 0, so
    each query was searched again with 4 times the candidates until it had measured the whole bank; float64
    values near 1e-181 also measured every distance as 0; cosine refused both as length 0, and float64 values
    past ~1e154 were refused. Rows times a power of two must give the rows' own neighbours, at their distances
    times it (bit for bit: the search sees the same rows), in the first search (k + EXTRA_CANDIDATES each); the
    fused search the same neighbours and distances, for a different power in each channel."""
    asked = []
    search = neighbors._search_torch

    def counting(queries, **kwargs):
        asked.append(kwargs["wanted"])
        return search(queries, **kwargs)

    monkeypatch.setattr(neighbors, "_search_torch", counting)
    rng = seeded_rng()
    bank = (rng.normal(size=(3000, 16)) + 2).astype(dtype)
    queries = (rng.normal(size=(40, 16)) + 2).astype(dtype)
    k = 5
    ref_d, ref_i = neighbors.nearest(queries, bank, k, metric)
    assert asked == [k + neighbors.EXTRA_CANDIDATES]
    distances, indices = neighbors.nearest(queries * dtype(factor), bank * dtype(factor), k, metric)
    assert asked == [k + neighbors.EXTRA_CANDIDATES] * 2
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_array_equal(distances, ref_d * dtype(factor) if metric == "euclidean" else ref_d)

    factors = np.array([1, factor, 1 / factor], dtype=dtype)[None, :, None]
    ref_d, ref_i = neighbors.fused_nearest(queries[:, None].repeat(3, 1), bank[:, None].repeat(3, 1), k)
    distances, indices = neighbors.fused_nearest(queries[:, None] * factors, bank[:, None] * factors, k)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_array_equal(distances, ref_d)


def fused_reference(queries, bank, k, exclude):
    """Fused distances in float64 from the rows' differences (torch.cdist without its matrix product), each
    (query, channel) row z-scored over the bank less the query's excluded row; equal ones in bank order."""
    q, b = torch.as_tensor(queries).transpose(0, 1), torch.as_tensor(bank).transpose(0, 1)  # (C, rows, E)
    distances = torch.cdist(q, b, compute_mode="donot_use_mm_for_euclid_dist")  # (C, Q, B)
    keep = torch.ones(distances.shape[1:], dtype=torch.bool)
    own = np.flatnonzero(exclude >= 0)
    keep[own, exclude[own]] = False
    count = keep.sum(1, keepdim=True)
    mean = (distances * keep).sum(2, keepdim=True) / count
    std = (((distances - mean) * keep) ** 2).sum(2, keepdim=True).div(count).sqrt()
    fused = ((distances - mean) / std).mean(0).masked_fill(~keep, float("inf")).numpy()
    order = np.argsort(fused, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(fused, order, 1), order


@pytest.mark.parametrize("k", [5, 40])
def test_fused_visits_the_bank_a_chunk_at_a_time(k, monkeypatch):
    """fused_nearest held every channel's prepared bank, and the bank, on the device: more than it has for a
    large bank. Now a chunk at a time (here 37 rows: 6 chunks, the last of 15, k above and below one chunk's
    rows, several blocks of queries), with each query's mean and std merged over the chunks: the neighbours of
    exact float64 z-scores, each query's own row out of its mean and std."""
    monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 37)
    prepared_rows = []
    preparer = neighbors._preparer

    def counting(*args, **kwargs):
        prepare = preparer(*args, **kwargs)
        return lambda rows: prepared_rows.append(len(rows)) or prepare(rows)

    monkeypatch.setattr(neighbors, "_preparer", counting)
    rng = seeded_rng()
    bank = rng.normal(size=(200, 3, 8)) * np.array([1, 10, 0.1])[None, :, None] + rng.normal(size=(1, 3, 8))
    queries = np.concatenate([bank[:12], bank[:11] + 0.3 * rng.normal(size=(11, 3, 8))])
    exclude = np.concatenate([np.arange(12), np.full(11, -1)])
    distances, indices = neighbors.fused_nearest(queries, bank, k, exclude=exclude, chunk_bytes=2**14)
    ref_d, ref_i = fused_reference(queries, bank, k, exclude)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-9, atol=1e-9)
    assert max(prepared_rows) <= 37  # queries (23) and bank rows alike


@pytest.mark.parametrize("fused", [False, True])
def test_wide_rows_are_searched_in_chunks_bounded_in_bytes(fused, monkeypatch):
    """A bank chunk was 65,536 rows whatever their width: MAFAULDA's 7 x 7680 features made one of 28 GB of
    prepared float64 rows. Wide rows now come fewer at a time (here 9 rows of 3 x 8), with the neighbours of
    brute force."""
    monkeypatch.setattr(neighbors, "BANK_CHUNK_BYTES", 8 * 3 * 8 * 9)
    chunk_rows = []
    prepared_chunk = neighbors._prepared_chunk

    def counting(*args):
        rows, squares = prepared_chunk(*args)
        chunk_rows.append(len(rows))
        return rows, squares

    monkeypatch.setattr(neighbors, "_prepared_chunk", counting)
    rng = seeded_rng()
    bank = rng.normal(size=(40, 3, 8)) + 2.0
    queries = np.concatenate([bank[:6], rng.normal(size=(5, 3, 8)) + 2.0])
    exclude = np.concatenate([np.arange(6), np.full(5, -1)])
    if fused:
        distances, indices = neighbors.fused_nearest(queries, bank, 4, exclude=exclude)
        ref_d, ref_i = fused_reference(queries, bank, 4, exclude)
    else:
        distances, indices = neighbors.nearest(queries.reshape(11, -1), bank.reshape(40, -1), 4, exclude=exclude)
        ref_d, ref_i = brute_force(queries.reshape(11, -1), bank.reshape(40, -1), 4, "euclidean", exclude)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-9, atol=1e-9)
    assert max(chunk_rows) == 9 and sum(chunk_rows) >= 40


@pytest.mark.parametrize("fused", [False, True])
def test_a_bank_chunk_is_let_go_before_the_next_is_prepared(fused, monkeypatch):
    """The last chunk was kept (lru_cache) while the next was prepared: 1.5-2x a chunk, a GB more at the
    default size. A bank of one chunk is prepared once for a search's round (the fused search's two passes)."""
    import weakref

    earlier, alive = [], []
    prepared_chunk = neighbors._prepared_chunk

    def watching(*args):
        alive.append(sum(ref() is not None for ref in earlier))
        rows, squares = prepared_chunk(*args)
        earlier.append(weakref.ref(rows))
        return rows, squares

    monkeypatch.setattr(neighbors, "_prepared_chunk", watching)
    rng = seeded_rng()
    bank = rng.normal(size=(50, 1, 6))
    search = (lambda rows, k: neighbors.fused_nearest(rows, bank, k)) if fused else (
        lambda rows, k: neighbors.nearest(rows[:, 0], bank[:, 0], k))
    search(bank[:20] + 0.01, 45)  # k + 16 candidates are more than the bank: a second round
    assert alive == [0]  # one chunk, prepared once
    monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 12)
    earlier.clear(), alive.clear()
    search(bank[:20] + 0.01, 3)
    assert len(alive) >= 5 and alive == [0] * len(alive)


def test_fused_ties_across_bank_chunks_come_in_bank_order(monkeypatch):
    """Integer points repeat: many rows at exactly equal fused distance, in different chunks of the bank (channel 1
    is channel 0 times 4: the same z-scores, no near ties between channels)."""
    monkeypatch.setattr(neighbors, "BANK_CHUNK_ROWS", 37)
    rng = seeded_rng()
    points = rng.integers(0, 4, size=(230, 2)).astype(np.float64)
    rows = np.stack([points, 4 * points], 1)
    bank, queries = rows[:200], np.concatenate([rows[:10], rows[200:]])
    exclude = np.concatenate([np.arange(10), np.full(30, -1)])
    distances, indices = neighbors.fused_nearest(queries, bank, 7, exclude=exclude, chunk_bytes=2**14)
    ref_d, ref_i = fused_reference(queries, bank, 7, exclude)
    assert (ref_d[:, 1:] == ref_d[:, :-1]).sum() > 100
    np.testing.assert_array_equal(indices, ref_i)
    # the mean and std are the search's: its distances between equal rows are ~1e-8 (|q| sqrt(eps)), not 0
    np.testing.assert_allclose(distances, ref_d, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_of_rows_of_very_different_lengths_is_their_cosine(dtype):
    """float32 rows were measured unscaled, where a bank 1e20 times longer than its queries left terms ~1e20 that
    cancel: 1 - cos came out as 6.6e6 (and queries below 1e-37 were refused as past float32's range)."""
    rng = seeded_rng()
    queries, bank = rng.standard_normal((3, 16)), rng.standard_normal((6, 16))
    cosine = 1 - (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    for q, b in ((queries, bank * 1e20), (queries * 1e-38, bank)):
        distances, indices = neighbors.nearest(q.astype(dtype), b.astype(dtype), 2, "cosine")
        np.testing.assert_allclose(distances, np.take_along_axis(cosine, indices, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(indices, np.argsort(cosine, axis=1, kind="stable")[:, :2])
