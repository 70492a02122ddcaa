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
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.verify.errors import VerifyError
from corolla.verify.events import Comparison, Work
from corolla.verify.tolerance import (
    PRECISIONS,
    ROW_FLOOR,
    Match,
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
    if {a, b} == {"float32"}:  # float16's inference bound (step gap included) sits at 1% noise
        return ("noise", *_GROSS)
    return _GROSS


def test_compare_matches_a_hand_computation() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 2.5], [3.0, 3.0]])
    # row 0: diff (0, -0.5), rms(b_0) = sqrt((1 + 6.25) / 2); row 1: diff (0, 1), rms(b_1) = 3
    rel0, rel1 = math.sqrt(0.125) / math.sqrt(3.625), math.sqrt(0.5) / 3.0
    result = compare(a, b, Tolerance(rel_l2=0.3, max_abs=1.0))
    assert result.rel_l2 == pytest.approx(max(rel0, rel1), rel=1e-15)  # the worse row: 0.2357
    assert result.max_abs == pytest.approx(max(0.5 / math.sqrt(3.625), 1.0 / 3.0), rel=1e-15)
    assert result.agree
    assert not compare(a, b, Tolerance(rel_l2=0.2, max_abs=1.0)).agree  # rel_l2 0.2357 too large
    assert not compare(a, b, Tolerance(rel_l2=0.3, max_abs=0.3)).agree  # scaled max 0.3333 too large


def test_a_small_row_is_not_hidden_by_a_large_one() -> None:
    """An attention-sink position of RMS 300 beside ordinary ones of RMS 1: a 10% error on an
    ordinary position is 10% there, not 0.03% of the whole tensor."""
    b = torch.ones(4, 8)
    b[0] *= 300.0
    a = b.clone()
    a[2] *= 1.1
    result = compare(a, b, LOOSE)
    assert result.rel_l2 == pytest.approx(0.1, rel=1e-6) and result.max_abs == pytest.approx(0.1, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(3,), (2, 5), (2, 3, 4)]),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-30, 30),
    noise=st.floats(1e-6, 1.0),
    rel=st.floats(1e-5, 2.0),
    mx=st.floats(1e-5, 10.0),
)
def test_verdicts_do_not_depend_on_scale(
    shape: tuple[int, ...], seed: int, exponent: int, noise: float, rel: float, mx: float
) -> None:
    """Multiplying both tensors by c > 0 gives the same figures and verdict: exactly for powers
    of two (no rounding), to 1e-12 relative for any c."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    a = b + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
    tol = Tolerance(rel_l2=rel, max_abs=mx)
    base = compare(a, b, tol)
    scaled = compare(a * 2.0**exponent, b * 2.0**exponent, tol)
    assert scaled == base
    c = 3.7 * 10.0 ** (exponent / 10)
    other = compare(a * c, b * c, tol)
    assert other.rel_l2 == pytest.approx(base.rel_l2, rel=1e-12)
    assert other.max_abs == pytest.approx(base.max_abs, rel=1e-12)


def test_compare_is_in_float64_whatever_the_inputs() -> None:
    b = torch.full((1, 1000), 1.0, dtype=torch.bfloat16)
    a = b.clone()
    a[0, 0] = 1.0078125  # one bfloat16 ulp above 1
    result = compare(a, b, LOOSE)
    assert result.max_abs == 0.0078125
    assert result.rel_l2 == pytest.approx(0.0078125 / math.sqrt(1000), rel=1e-12)
    assert compare(b, b, Tolerance(rel_l2=1e-12, max_abs=1e-12)) == Comparison(rel_l2=0.0, max_abs=0.0, agree=True)


def test_compare_against_zeros_does_not_divide_by_zero() -> None:
    zeros = torch.zeros(4)
    assert compare(zeros, zeros, LOOSE).agree
    result = compare(torch.ones(4), zeros, LOOSE)
    assert not result.agree and math.isfinite(result.rel_l2) and math.isfinite(result.max_abs)
    # A zero row beside non-zero ones (the input gradient of the last position) is held to the
    # floor: ROW_FLOOR of the whole reference's RMS.
    b = torch.ones(2, 4, dtype=torch.float64)
    b[1] = 0.0
    a = b.clone()
    a[1] = 1e-6
    whole = math.sqrt(0.5)
    assert compare(a, b, LOOSE).rel_l2 == pytest.approx(1e-6 / (ROW_FLOOR * whole), rel=1e-9)


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

SMOLLM2 = "smollm2-135m-instruct"


def test_the_shipped_file_has_a_tiny_and_a_smollm2_entry() -> None:
    text = resources.files("corolla.verify").joinpath("data/tolerances.json").read_text()
    json.loads(text)
    table = ToleranceTable.model_validate_json(text)
    assert set(table.models) == {"tiny", SMOLLM2}
    tiny = table.models["tiny"]
    assert set(tiny.tolerances) == {pair_key(a, b) for a, b in combinations_with_replacement(PRECISIONS, 2)}
    assert tiny.hidden_sizes == [64, 128]
    smol = table.models[SMOLLM2]
    assert smol.hidden_sizes == [576] and len(smol.fingerprints) == 1
    assert {"float32/float32", "bfloat16/float32", "float32/int8", "float32/nf4"} <= set(smol.tolerances)
    for entry in table.models.values():
        for works in entry.tolerances.values():
            assert set(works) == set(Work)


def test_lookup_by_fingerprint_then_width_then_fallback() -> None:
    table = load_table()
    smol = table.models[SMOLLM2]
    model_id = f"any-dir-name-{smol.fingerprints[0]}"
    exact = tolerance_for("int8", "float32", Work.FORWARD, model_id=model_id, hidden_size=123)
    entry = smol.tolerances["float32/int8"][Work.FORWARD]
    assert exact == Tolerance(rel_l2=entry.rel_l2, max_abs=entry.max_abs, match=Match.MODEL)
    by_width = tolerance_for("int8", "float32", Work.FORWARD, model_id="other-000000000000", hidden_size=64)
    tiny = table.models["tiny"].tolerances["float32/int8"][Work.FORWARD]
    assert (by_width.rel_l2, by_width.max_abs, by_width.match) == (tiny.rel_l2, tiny.max_abs, Match.SCALE)
    assert tolerance_for("float32", "int8", "forward", model_id=model_id) == exact  # either order


def test_an_unknown_model_is_audited_with_the_widened_loosest_bound() -> None:
    """The fallback: never silently trusted (a finite bound, so gross corruption still fails),
    never falsely accused (wider than every calibrated model's bound for the pair)."""
    table = load_table()
    for a, b in (("float32", "float32"), ("int8", "float32"), ("bfloat16", "int8")):
        for work in Work:
            tol = tolerance_for(a, b, work, model_id="mystery-0123456789ab", hidden_size=4096)
            assert tol.match == Match.FALLBACK
            known = [m.tolerances[pair_key(a, b)][work] for m in table.models.values()]
            assert tol.rel_l2 == table.fallback_factor * max(e.rel_l2 for e in known)
            assert tol.max_abs == table.fallback_factor * max(e.max_abs for e in known)
            assert tol.rel_l2 < 1e6  # a bound, not a pass for anything
    assert tolerance_for("float32", "float32", Work.FORWARD).match == Match.FALLBACK  # no model named
    # float16 was not calibrated on SmolLM2: its servers there are held to the fallback too
    smol_id = f"x-{table.models[SMOLLM2].fingerprints[0]}"
    assert tolerance_for("float16", "float32", Work.FORWARD, model_id=smol_id).match == Match.FALLBACK


def test_a_mixed_pair_gets_the_looser_of_its_precisions() -> None:
    for a, b in combinations_with_replacement(PRECISIONS, 2):
        for work in (Work.FORWARD, Work.BACKWARD):  # inference adds the step-gap model (disagreements.py)
            mixed = tolerance_for(a, b, work, hidden_size=64)
            for p in (a, b):
                own = tolerance_for(p, "float32", work, hidden_size=64)
                assert mixed.rel_l2 >= own.rel_l2 and mixed.max_abs >= own.max_abs
    # and a quantized pair is looser than float32 alone
    assert (
        tolerance_for("nf4", "float32", Work.FORWARD, hidden_size=64).rel_l2
        > tolerance_for("float32", "float32", "forward", hidden_size=64).rel_l2
    )


def test_unknown_precision_and_work_name_the_allowed_ones() -> None:
    with pytest.raises(VerifyError, match=r"'fp8'.*float32, bfloat16, float16, int8, nf4"):
        tolerance_for("fp8", "float32", Work.FORWARD)
    with pytest.raises(VerifyError, match=r"'training'.*inference, forward, backward"):
        tolerance_for("float32", "float32", "training")


def test_a_table_without_the_pair_is_an_error() -> None:
    table = load_table()
    tiny = table.models["tiny"]
    only = tiny.model_copy(update={"tolerances": {"float32/float32": tiny.tolerances["float32/float32"]}})
    partial = table.model_copy(update={"models": {"tiny": only}})
    assert tolerance_for("float32", "float32", Work.FORWARD, table=partial, hidden_size=64)
    with pytest.raises(VerifyError, match="no entry for bfloat16/float32"):
        tolerance_for("bfloat16", "float32", Work.FORWARD, table=partial, hidden_size=64)


def test_load_table_rejects_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "corolla-tolerances/2", "models": {}}')
    with pytest.raises(VerifyError, match="not a valid tolerance table"):
        load_table(bad)
    bad.write_text('{"format": "corolla-tolerances/1", "settings": {}}')
    with pytest.raises(VerifyError, match=r"is a format-1 tolerance table .* re-run `platform audit calibrate`"):
        load_table(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the tolerance table {path}: No such file or directory"),
        (b"\xff{}", "cannot read the tolerance table {path}: 'utf-8' codec can't decode byte 0xff"),
        (b"[1, 2]", "{path} is not a valid tolerance table (1 error; first: Input should be an object)"),
        (
            b'{"format": "corolla-tolerances/3", "models": {}}',
            "{path} is not a valid tolerance table (2 errors; first: format: Input should be 'corolla-tolerances/2')",
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
    with pytest.raises(VerifyError, match=r"^a train message is not a valid tolerance table \(1 error; first: models"):
        parse_table("{}", where="a train message")


@pytest.mark.parametrize("key", sorted({pair_key(a, b) for a, b in combinations_with_replacement(PRECISIONS, 2)}))
def test_shipped_tiny_tolerances_sit_above_honest_and_below_corruption(key: str) -> None:
    entry_of = load_table().models["tiny"]
    safety = float(entry_of.settings["safety_factor"])  # type: ignore[arg-type]
    for work, entry in entry_of.tolerances[key].items():
        assert entry.honest_comparisons > 0
        # the measured honest disagreement of the pair is at least `safety` times inside the tolerance
        assert entry.rel_l2 >= safety * entry.honest_max_rel_l2 * (1 - 1e-12)
        assert entry.max_abs >= safety * entry.honest_max_abs * (1 - 1e-12)
        for kind in must_catch(key):
            where = f"{key} {work.value} {kind}"
            assert entry.corruption_undetected[kind] == 0.0, where


def test_shipped_smollm2_entry_models_the_cached_step_gap() -> None:
    """The float32 inference bound covers 4 x (step gap + forward disagreement), and the gap
    measured on the real model is tiny (a few ulps per block), so the bound is the floor."""
    entry = load_table().models[SMOLLM2]
    f32 = entry.per_precision["float32"][Work.INFERENCE]
    gap_rel, gap_abs = f32["step_gap_rel_l2"], f32["step_gap_max_abs"]
    assert 0 < gap_rel < 1e-4 and 0 < gap_abs < 1e-3
    tol = entry.tolerances["float32/float32"][Work.INFERENCE]
    assert tol.rel_l2 >= 4 * gap_rel and tol.max_abs >= 4 * gap_abs
    # skip-block and other weights stay detectable between float32 servers of the real model
    for kind in ("skip_block", "other_weights", "identity"):
        assert tol.corruption_undetected[kind] == 0.0, kind
