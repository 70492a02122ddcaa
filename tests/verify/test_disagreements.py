"""`Disagreements.table`: measured disagreements become tolerances (the maths of the calibration)."""

from __future__ import annotations

import pytest
import torch

from corolla.verify.disagreements import Disagreements, Margins
from corolla.verify.errors import VerifyError
from corolla.verify.events import Work
from corolla.verify.tolerance import Tolerance, compare, row_metrics

MARGINS = Margins(safety_factor=4.0, rel_l2_floor=1e-4, max_abs_floor=1e-4)


def _off_by(*errors: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one element: (1 + e) against 1, so the relative L2 and the largest difference are both e."""
    b = torch.ones(len(errors), 1, dtype=torch.float64)
    return b + torch.tensor(errors, dtype=torch.float64).view(-1, 1), b


def test_row_metrics_equal_compare_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 7, generator=gen), torch.randn(5, 3, 7, generator=gen)
    rel, max_abs = row_metrics(a, b)
    for i in range(5):
        want = compare(a[i], b[i], Tolerance(rel_l2=1.0, max_abs=1.0))
        assert rel[i].item() == pytest.approx(want.rel_l2, rel=1e-12)
        assert max_abs[i].item() == want.max_abs


def test_tolerances_follow_the_rule_by_hand() -> None:
    m = Disagreements()
    m.add_honest(Work.FORWARD, "float32", "float32", *_off_by(1e-6, 2e-6))
    m.add_honest(Work.FORWARD, "bfloat16", "float32", *_off_by(0.01, 0.005))
    m.add_honest(Work.FORWARD, "float32", "bfloat16", *_off_by(0.002))
    m.add_honest(Work.FORWARD, "bfloat16", "bfloat16", *_off_by(0.015))
    m.add_corrupted(Work.FORWARD, "noise", "bfloat16", "float32", *_off_by(0.03, 0.5))
    m.add_corrupted(Work.FORWARD, "identity", "float32", "bfloat16", *_off_by(0.5))
    table = m.table(MARGINS, settings={"samples": 1}, hidden_sizes=[64])

    assert set(table.tolerances) == {"float32/float32", "bfloat16/float32", "bfloat16/bfloat16"}
    f32 = table.tolerances["float32/float32"][Work.FORWARD]
    assert (f32.rel_l2, f32.max_abs) == (1e-4, 1e-4)  # 4 x 2e-6 is under the floor
    assert f32.honest_comparisons == 2
    mixed = table.tolerances["bfloat16/float32"][Work.FORWARD]
    assert mixed.rel_l2 == pytest.approx(0.04)  # T(bfloat16) = 4 x 0.01, looser than T(float32)
    assert mixed.honest_comparisons == 3  # both directions count for the pair
    assert mixed.corruption_min_rel_l2 == {"noise": pytest.approx(0.03), "identity": pytest.approx(0.5)}
    assert mixed.corruption_undetected == {"noise": 0.5, "identity": 0.0}  # 0.03 passes, 0.5 does not
    same = table.tolerances["bfloat16/bfloat16"][Work.FORWARD]
    assert same.rel_l2 == pytest.approx(0.06)  # the pair's own 0.015 x 4 beats T(bfloat16)
    assert table.per_precision["bfloat16"][Work.FORWARD]["max_rel_l2_vs_float32"] == pytest.approx(0.01)
    # Work kinds nothing was measured for get the floors.
    assert table.tolerances["bfloat16/float32"][Work.BACKWARD].rel_l2 == 1e-4
    assert table.settings == {"samples": 1, "safety_factor": 4.0, "rel_l2_floor": 1e-4, "max_abs_floor": 1e-4}


def test_without_float32_there_is_no_table() -> None:
    m = Disagreements()
    m.add_honest(Work.FORWARD, "bfloat16", "bfloat16", *_off_by(0.01))
    with pytest.raises(VerifyError, match="no float32 run"):
        m.table(MARGINS, settings={}, hidden_sizes=[64])


def test_unknown_precisions_are_refused() -> None:
    with pytest.raises(VerifyError, match="precision 'fp8'"):
        Disagreements().add_honest(Work.FORWARD, "fp8", "float32", *_off_by(0.01))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"safety_factor": 1.5}, "safety_factor=1.5 must be >= 2"),
        ({"rel_l2_floor": 0.0}, "rel_l2_floor=0.0"),
        ({"max_abs_floor": float("inf")}, "max_abs_floor=inf"),
    ],
)
def test_margins_validation(change: dict[str, float], message: str) -> None:
    with pytest.raises(VerifyError, match=message):
        Margins(**change)


def test_the_inference_bound_covers_the_cached_step_gap() -> None:
    """A float32 server's cached steps differ from its own parallel forward by g; against
    another float32 server's recompute the bound is at least 4 x (g + forward disagreement)."""
    m = Disagreements()
    m.add_honest(Work.FORWARD, "float32", "float32", *_off_by(5e-5))
    m.add_honest(Work.INFERENCE, "float32", "float32", *_off_by(1e-5))
    m.add_step_gap("float32", *_off_by(3e-4))
    table = m.table(MARGINS, settings={}, hidden_sizes=[576], fingerprints=["abc"])
    entry = table.tolerances["float32/float32"][Work.INFERENCE]
    assert entry.rel_l2 == pytest.approx(4 * (3e-4 + 5e-5)) and entry.max_abs == pytest.approx(4 * (3e-4 + 5e-5))
    assert table.per_precision["float32"][Work.INFERENCE]["step_gap_rel_l2"] == pytest.approx(3e-4)
    assert table.tolerances["float32/float32"][Work.FORWARD].rel_l2 == pytest.approx(2e-4)  # no gap there
    assert (table.hidden_sizes, table.fingerprints) == ([576], ["abc"])
