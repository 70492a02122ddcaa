"""Output comparison and the shipped tolerance table."""

from __future__ import annotations

import json
import math
import sys
from importlib import resources
from itertools import combinations_with_replacement
from pathlib import Path

import pytest
import torch

from corolla.verify.errors import VerifyError
from corolla.verify.events import Comparison, Work
from corolla.verify.tolerance import (
    PRECISIONS,
    Tolerance,
    ToleranceTable,
    compare,
    load_table,
    pair_key,
    parse_table,
    tolerance_for,
)

LOOSE = Tolerance(rel_l2=1.0, max_abs=10.0)

# Which corruptions the shipped table must catch every time, per pair (see calibration's docstring),
# and by what factor the smallest corrupted disagreement must exceed the tolerance.
# 1% noise is within honest bfloat16 / int8 / nf4 rounding against float32, so only pairs of
# float32 and float16 can see it. nf4 on the tiny random checkpoints disagrees with float32 by up
# to 37%, so with the 4x safety factor its tolerance (1.2-1.5) lets every corruption measured through:
# nf4 pairs are unverifiable on these models, and the table says so (`corruption_undetected`).
_GROSS = ("skip_block", "other_weights", "identity")
MARGIN = 1.5


def must_catch(key: str) -> tuple[str, ...]:
    a, b = key.split("/")
    if "nf4" in (a, b):
        return ()
    if {a, b} <= {"float32", "float16"}:
        return ("noise", *_GROSS)
    return _GROSS


def test_compare_matches_a_hand_computation() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 2.5], [3.0, 3.0]])
    # diff = (0, -0.5, 0, 1): ||diff|| = sqrt(1.25); ||b|| = sqrt(1 + 6.25 + 9 + 9) = sqrt(25.25)
    want = math.sqrt(1.25) / math.sqrt(25.25)
    result = compare(a, b, Tolerance(rel_l2=0.3, max_abs=1.0))
    assert result.rel_l2 == pytest.approx(want, rel=1e-15)
    assert (result.max_abs, result.agree) == (1.0, True)
    assert not compare(a, b, Tolerance(rel_l2=0.2, max_abs=1.0)).agree  # rel_l2 0.2225 too large
    assert not compare(a, b, Tolerance(rel_l2=0.3, max_abs=0.99)).agree  # max_abs too large


def test_compare_is_in_float64_whatever_the_inputs() -> None:
    b = torch.full((1000,), 1.0, dtype=torch.bfloat16)
    a = b.clone()
    a[0] = 1.0078125  # one bfloat16 ulp above 1
    result = compare(a, b, LOOSE)
    assert result.max_abs == 0.0078125
    assert result.rel_l2 == pytest.approx(0.0078125 / math.sqrt(1000), rel=1e-12)
    assert compare(b, b, Tolerance(rel_l2=1e-12, max_abs=1e-12)) == Comparison(rel_l2=0.0, max_abs=0.0, agree=True)


def test_compare_against_zeros_does_not_divide_by_zero() -> None:
    zeros = torch.zeros(4)
    assert compare(zeros, zeros, LOOSE).agree
    result = compare(torch.ones(4), zeros, LOOSE)
    assert not result.agree and math.isfinite(result.rel_l2) and result.max_abs == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["a", "b"])
def test_non_finite_values_disagree_and_stay_json(bad: float, where: str) -> None:
    good = torch.ones(3, 4)
    broken = good.clone()
    broken[1, 2] = bad
    a, b = (broken, good) if where == "a" else (good, broken)
    result = compare(a, b, LOOSE)
    assert not result.agree
    assert result.rel_l2 == result.max_abs == sys.float_info.max
    json.loads(json.dumps(result.model_dump(mode="json"), allow_nan=False))  # still valid JSON


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(VerifyError, match=r"\(2, 3\) and \(3, 2\)"):
        compare(torch.zeros(2, 3), torch.zeros(3, 2), LOOSE)


@pytest.mark.parametrize("field", ["rel_l2", "max_abs"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_tolerance_validation(field: str, value: float) -> None:
    kwargs = {"rel_l2": 0.1, "max_abs": 0.1, field: value}
    with pytest.raises(VerifyError, match=field):
        Tolerance(**kwargs)


# -- the shipped table ----------------------------------------------------------------------


def test_the_shipped_file_is_valid_json_with_every_pair_and_work() -> None:
    text = resources.files("corolla.verify").joinpath("data/tolerances.json").read_text()
    json.loads(text)
    table = ToleranceTable.model_validate_json(text)
    want = {pair_key(a, b) for a, b in combinations_with_replacement(PRECISIONS, 2)}
    assert set(table.tolerances) == want
    for works in table.tolerances.values():
        assert set(works) == set(Work)


def test_tolerance_for_looks_up_either_order() -> None:
    table = load_table()
    for a, b in combinations_with_replacement(PRECISIONS, 2):
        for work in Work:
            tol = tolerance_for(a, b, work)
            entry = table.tolerances[pair_key(a, b)][work]
            assert tol == Tolerance(rel_l2=entry.rel_l2, max_abs=entry.max_abs)
            assert tolerance_for(b, a, work.value) == tol


def test_a_mixed_pair_gets_the_looser_of_its_precisions() -> None:
    for a, b in combinations_with_replacement(PRECISIONS, 2):
        for work in Work:
            mixed = tolerance_for(a, b, work)
            for p in (a, b):
                own = tolerance_for(p, "float32", work)
                assert mixed.rel_l2 >= own.rel_l2 and mixed.max_abs >= own.max_abs
    # and a quantized pair is looser than float32 alone
    assert tolerance_for("nf4", "float32", Work.FORWARD).rel_l2 > tolerance_for("float32", "float32", "forward").rel_l2


def test_unknown_precision_and_work_name_the_allowed_ones() -> None:
    with pytest.raises(VerifyError, match=r"'fp8'.*float32, bfloat16, float16, int8, nf4"):
        tolerance_for("fp8", "float32", Work.FORWARD)
    with pytest.raises(VerifyError, match=r"'training'.*inference, forward, backward"):
        tolerance_for("float32", "float32", "training")


def test_a_table_without_the_pair_is_an_error() -> None:
    table = load_table()
    partial = table.model_copy(update={"tolerances": {"float32/float32": table.tolerances["float32/float32"]}})
    assert tolerance_for("float32", "float32", Work.FORWARD, table=partial)
    with pytest.raises(VerifyError, match="no entry for bfloat16/float32"):
        tolerance_for("bfloat16", "float32", Work.FORWARD, table=partial)


def test_load_table_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "corolla-tolerances/1", "settings": {}}')
    with pytest.raises(VerifyError, match="not a valid tolerance table"):
        load_table(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the tolerance table {path}: No such file or directory"),
        (b"\xff{}", "cannot read the tolerance table {path}: 'utf-8' codec can't decode byte 0xff"),
        (b"[1, 2]", "{path} is not a valid tolerance table (1 error; first: Input should be an object)"),
        (
            b'{"format": "corolla-tolerances/2", "settings": {}, "per_precision": {}, "tolerances": {}}',
            "{path} is not a valid tolerance table (1 error; first: format: Input should be 'corolla-tolerances/1')",
        ),
    ],
    ids=["missing", "not UTF-8", "not an object", "another format"],
)
def test_a_table_that_cannot_be_used_names_the_file_and_the_first_problem(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "calibrated.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VerifyError) as info:
        load_table(path)
    assert str(info.value).startswith(message.format(path=path))
    with pytest.raises(VerifyError, match=r"cannot read the tolerance table .*: Is a directory"):
        load_table(tmp_path)


def test_a_table_round_trips_through_json() -> None:
    """What a coordinator sends its sites (`model_dump_json`) parses back to the same table."""
    table = load_table()
    assert parse_table(table.model_dump_json(), where="a train message") == table
    with pytest.raises(
        VerifyError, match=r"^a train message is not a valid tolerance table \(3 errors; first: settings"
    ):
        parse_table("{}", where="a train message")


@pytest.mark.parametrize("key", sorted({pair_key(a, b) for a, b in combinations_with_replacement(PRECISIONS, 2)}))
def test_shipped_tolerances_sit_above_honest_and_below_corruption(key: str) -> None:
    table = load_table()
    safety = float(table.settings["safety_factor"])  # type: ignore[arg-type]
    for work, entry in table.tolerances[key].items():
        assert entry.honest_comparisons > 0
        # the measured honest disagreement of the pair is at least `safety` times inside the tolerance
        assert entry.rel_l2 >= safety * entry.honest_max_rel_l2 * (1 - 1e-12)
        assert entry.max_abs >= safety * entry.honest_max_abs * (1 - 1e-12)
        for kind in must_catch(key):
            where = f"{key} {work.value} {kind}"
            assert entry.corruption_undetected[kind] == 0.0, where
            # caught by relative L2 alone, with room to spare
            assert MARGIN * entry.rel_l2 < entry.corruption_min_rel_l2[kind], where
        if not must_catch(key):
            assert entry.corruption_undetected["skip_block"] > 0  # the weakness is on record
