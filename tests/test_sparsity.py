"""Patterns and colourings (pure numpy/scipy): every colouring is checked entry by entry
against the definition, on structured and random patterns, for both axes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from raijac.errors import ProblemError
from raijac.sparsity import Pattern, choose, colour, make_pattern


def _band(n: int, offsets: list[int]) -> sp.csr_array:
    return sp.diags_array([np.ones(n - abs(k)) for k in offsets], offsets=offsets, shape=(n, n)).tocsr()


def _laplacian(n: int) -> sp.csr_array:
    one = _band(n, [-1, 0, 1])
    eye = sp.identity(n, format="csr")
    return (sp.kron(eye, one) + sp.kron(one, eye)).tocsr()


def _random(m: int, n: int, density: float, seed: int) -> sp.csr_array:
    rng = np.random.default_rng(seed)
    k = int(m * n * density)
    return sp.csr_array((np.ones(k), (rng.integers(0, m, k), rng.integers(0, n, k))), shape=(m, n))


def _arrow(n: int) -> sp.csr_array:
    a = sp.identity(n, format="lil")
    a[0, :] = 1
    return sp.csr_array(a)


PATTERNS = {
    "tridiagonal": lambda: _band(50, [-1, 0, 1]),
    "pentadiagonal": lambda: _band(60, [-2, -1, 0, 1, 2]),
    "periodic": lambda: (_band(40, [-1, 0, 1]) + sp.csr_array(([1, 1], ([0, 39], [39, 0])), shape=(40, 40))).tocsr(),
    "laplacian_2d": lambda: _laplacian(9),
    "random_wide": lambda: _random(40, 90, 0.05, 0),
    "random_tall": lambda: _random(120, 30, 0.08, 1),
    "arrow": lambda: _arrow(30),
    "block_diagonal": lambda: sp.block_diag([np.ones((3, 4))] * 6, format="csr"),
    "empty_rows": lambda: sp.csr_array(([1.0, 1.0, 1.0], ([0, 0, 5], [1, 3, 3])), shape=(8, 6)),
    "diagonal": lambda: sp.identity(25, format="csr"),
}


def _valid(dense: np.ndarray, colours: np.ndarray, axis: str) -> bool:
    """The definition: no two non-zeros of one row share a column colour (or of one column a row colour)."""
    lines = dense if axis == "cols" else dense.T
    for line in lines:
        used = colours[np.flatnonzero(line)]
        if len(set(used.tolist())) != used.size:
            return False
    return True


@pytest.mark.parametrize("axis", ["cols", "rows"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_colouring_is_a_valid_distance_2_colouring(name, axis):
    matrix = PATTERNS[name]()
    pattern = make_pattern(matrix, matrix.shape)
    dense = matrix.toarray() != 0
    c = colour(pattern, axis)
    assert c.colours.shape == (dense.shape[1] if axis == "cols" else dense.shape[0],)
    assert c.n_colours == (int(c.colours.max()) + 1 if c.colours.size else 0)
    assert _valid(dense, c.colours, axis)
    lower = int((dense if axis == "cols" else dense.T).sum(axis=1).max())
    assert c.n_colours >= max(lower, 1)


@pytest.mark.parametrize("offsets,expected", [([-1, 0, 1], 3), ([-2, -1, 0, 1, 2], 5), ([0, 1], 2), ([0], 1)])
def test_banded_patterns_get_the_optimal_count(offsets, expected):
    matrix = _band(200, offsets)
    c = colour(make_pattern(matrix, matrix.shape), "cols")
    assert c.n_colours == expected
    assert "optimal" in c.method


def test_large_laplacian_colours_fast_and_near_optimal():
    import time

    matrix = _laplacian(300)  # N = 90 000
    start = time.perf_counter()
    pattern = make_pattern(matrix, matrix.shape)
    c = colour(pattern, "cols")
    assert time.perf_counter() - start < 5
    assert 5 <= c.n_colours <= 7  # 5 is optimal for the 5-point stencil; random-order greedy gives 11


def test_greedy_beats_the_lower_bound_gap_on_random_patterns():
    matrix = _random(400, 400, 0.01, 3)
    pattern = make_pattern(matrix, matrix.shape)
    c = colour(pattern, "cols")
    assert c.method.startswith("greedy") or "cyclic" in c.method
    assert c.n_colours < 400 // 4  # far fewer JVPs than columns


def test_auto_picks_the_axis_with_fewer_colours():
    arrow = _arrow(30)  # a dense first row: 30 column colours, 2 row colours
    first, second = choose(make_pattern(arrow, arrow.shape), "auto")
    assert (first.axis, first.n_colours) == ("rows", 2)
    assert second.axis == "cols" and second.n_colours == 30
    first, _ = choose(make_pattern(arrow.T.tocsr(), arrow.shape), "auto")
    assert (first.axis, first.n_colours) == ("cols", 2)
    forced, other = choose(make_pattern(arrow, arrow.shape), "fwd")
    assert forced.axis == "cols" and other is None


def test_pattern_from_index_arrays_is_sorted_and_unique():
    p = make_pattern((np.array([2, 0, 2, 0]), np.array([1, 3, 1, 0])), (3, 4))
    assert isinstance(p, Pattern)
    assert p.rows.tolist() == [0, 0, 2] and p.cols.tolist() == [0, 3, 1]
    assert p.row_ptr().tolist() == [0, 2, 2, 3]
    assert p.digest() == make_pattern(sp.csr_array(([1, 1, 1], ([0, 0, 2], [0, 3, 1])), shape=(3, 4)), (3, 4)).digest()


def test_explicit_zeros_in_a_scipy_pattern_are_not_structural():
    m = sp.csr_array(([1.0, 0.0], ([0, 1], [0, 1])), shape=(2, 2))
    assert make_pattern(m, (2, 2)).nnz == 1


@pytest.mark.parametrize(
    "spec,message",
    [
        (sp.identity(4, format="csr"), "has shape (4, 4), but this Jacobian is 5 x 4"),
        ((np.array([0, 5]), np.array([0, 1])), "row index 5 is out of range"),
        ((np.array([0, 1]), np.array([-1, 1])), "column index -1 is out of range"),
        ((np.array([0, 1]), np.array([0])), "of one length"),
        ((np.array([0.0, 1.0]), np.array([0.0, 1.0])), "integer indices"),
        ("dense", "sparsity must be"),
        (np.eye(5, 4), "sparsity must be"),
    ],
)
def test_bad_patterns_are_refused_with_one_sentence(spec, message):
    with pytest.raises(ProblemError) as info:
        make_pattern(spec, (5, 4))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
