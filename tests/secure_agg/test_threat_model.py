"""The threshold rule against a coordinator that lies about who dropped out.

A model of what the coordinator can collect in one round, checked by exhaustive search.
Honest sites answer at most once, with a split (S_h, D_h) that passes their checks: h in
S_h, S_h and D_h partition the roster, |S_h| >= t. A reply reveals the replier's share of
b_j for every j in S_h (its own included), its pairwise seed s_hq for every q in D_h, and
its share of j's sharing of s_jq for every other j in S_h and q in D_h. Corrupt sites
(colluding with the coordinator) hand over everything they hold. The coordinator unmasks
an honest site k if it gets b_k (t shares) and every pairwise seed s_kj.

Search space: for the target k, each honest h != k either lists k as dropped (then the
biggest survivor set helps most: S_h = roster - {k}) or lists k as a survivor with some
D_h of the largest allowed size n - t; k itself lists some D_k of size n - t. Every other
answer reveals a subset of one of these, so this search covers all strategies.

`secure_threshold(n, colluding_sites=c)` = ceil((n + c) / 2) + 1 must be the smallest t at
which no strategy works.
"""

from __future__ import annotations

import itertools

import pytest

from corolla.secure_agg import ParameterError, secure_threshold


def secure_threshold_exists(n: int, c: int) -> bool:
    try:
        secure_threshold(n, colluding_sites=c)
    except ParameterError:
        return False
    return True


def coordinator_can_unmask(n: int, t: int, c: int) -> bool:
    k = 0
    corrupt = set(range(n - c, n))
    honest = [h for h in range(1, n) if h not in corrupt]

    def views(h: int) -> list[tuple[bool, frozenset[int]]]:  # (k listed as survivor, D_h)
        rest = [x for x in range(n) if x not in (h, k)]
        return [(False, frozenset({k}))] + [(True, frozenset(d)) for d in itertools.combinations(rest, n - t)]

    for d_k in itertools.combinations(range(1, n), n - t):
        for choice in itertools.product(*(views(h) for h in honest)):
            view = dict(zip(honest, choice, strict=True))
            if 1 + c + sum(survivor for survivor, _ in view.values()) < t:  # shares of b_k
                continue
            if all(
                j in corrupt
                or j in d_k  # k reveals s_kj
                or not view[j][0]  # j lists k as dropped: reveals s_jk
                # t shares of k's sharing of s_kj: from h listing k as survivor and j as dropped
                or c + sum(survivor and j in d for h, (survivor, d) in view.items() if h != j) >= t
                # t shares of j's sharing of s_jk: from h listing j as survivor and k as dropped
                or c + sum(not survivor for h, (survivor, _) in view.items() if h != j) >= t
                for j in range(1, n)
            ):
                return True
    return False


CASES = [(n, c) for n in (3, 4, 5, 6) for c in (0, 1, 2) if secure_threshold_exists(n, c)]


@pytest.mark.parametrize(("n", "c"), CASES)
def test_secure_threshold_is_the_smallest_safe_one(n: int, c: int) -> None:
    t = secure_threshold(n, colluding_sites=c)
    assert not coordinator_can_unmask(n, t, c)
    if t - 1 >= 2:
        assert coordinator_can_unmask(n, t - 1, c)  # tight: one less and a lying coordinator wins


@pytest.mark.slow
@pytest.mark.parametrize(("n", "c"), [(7, 0), (7, 1), (7, 2)])
def test_secure_threshold_is_the_smallest_safe_one_for_seven(n: int, c: int) -> None:
    """About 2.5 minutes for c = 0."""
    test_secure_threshold_is_the_smallest_safe_one(n, c)


def test_threshold_values_and_limits() -> None:
    assert [secure_threshold(n) for n in range(2, 21)] == [2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11]
    assert secure_threshold(10, colluding_sites=2) == 7
    with pytest.raises(ParameterError, match="no threshold protects 3 sites"):
        secure_threshold(3, colluding_sites=2)
    with pytest.raises(ParameterError, match="at least 2 sites"):
        secure_threshold(1)
