"""The calibration procedure, run small: it covers what the shipped table covers, and its maths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corolla.verify.calibration import CORRUPTIONS, CalibrationSettings, calibrate, main, row_metrics
from corolla.verify.errors import VerifyError
from corolla.verify.events import Work
from corolla.verify.tolerance import Tolerance, ToleranceTable, compare, load_table, tolerance_for

pytest.importorskip("bitsandbytes")

QUICK = CalibrationSettings(
    archs=("llama",),
    weight_seeds=(0,),
    hidden_sizes=(64,),
    num_layers=2,
    samples=1,
    batch=4,
    splits=((4,), (1, 1, 1, 1), (3, 1)),
    min_tokens=3,
    max_tokens=6,
    steps=2,
)


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory: pytest.TempPathFactory) -> ToleranceTable:
    return calibrate(QUICK, workdir=tmp_path_factory.mktemp("calibration"))


def test_a_quick_run_covers_every_entry_of_the_shipped_table(quick_table: ToleranceTable) -> None:
    shipped = load_table()
    assert set(quick_table.tolerances) == set(shipped.tolerances)
    for key, works in shipped.tolerances.items():
        assert set(quick_table.tolerances[key]) == set(works)
        for work, entry in quick_table.tolerances[key].items():
            assert entry.honest_comparisons > 0
            assert set(entry.corruption_min_rel_l2) == set(CORRUPTIONS) == set(works[work].corruption_min_rel_l2)
            assert entry.rel_l2 >= QUICK.rel_l2_floor and entry.max_abs >= QUICK.max_abs_floor
    assert set(quick_table.per_precision) == set(shipped.per_precision)
    assert quick_table.settings["samples"] == 1 and quick_table.settings["corruptions"] == list(CORRUPTIONS)


def test_a_quick_run_still_separates_float32_from_gross_corruption(quick_table: ToleranceTable) -> None:
    for work in Work:
        entry = quick_table.tolerances["float32/float32"][work]
        assert entry.honest_max_rel_l2 < 1e-5
        for kind in CORRUPTIONS:
            assert entry.corruption_undetected[kind] == 0.0
            assert entry.corruption_min_rel_l2[kind] > 10 * entry.rel_l2


def test_the_table_round_trips_and_serves_lookups(quick_table: ToleranceTable, tmp_path: Path) -> None:
    path = tmp_path / "tolerances.json"
    path.write_text(json.dumps(quick_table.model_dump(mode="json")))
    loaded = load_table(path)
    assert loaded == quick_table
    tol = tolerance_for("int8", "bfloat16", Work.BACKWARD, table=loaded)
    assert tol.rel_l2 == quick_table.tolerances["bfloat16/int8"][Work.BACKWARD].rel_l2


def test_row_metrics_equal_compare_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 7, generator=gen), torch.randn(5, 3, 7, generator=gen)
    b[2] = 0.0  # a zero row: the same tiny denominator as compare
    rel, max_abs = row_metrics(a, b)
    for i in range(5):
        want = compare(a[i], b[i], Tolerance(rel_l2=1.0, max_abs=1.0))
        assert rel[i].item() == pytest.approx(want.rel_l2, rel=1e-12)
        assert max_abs[i].item() == want.max_abs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples": 0}, "samples=0"),
        ({"num_layers": 1}, "num_layers=1"),
        ({"splits": ((8,), (4, 3))}, "splits="),
        ({"safety_factor": 1.5}, "safety_factor=1.5"),
        ({"archs": ("bert",)}, "archs="),
        ({"max_tokens": 5}, "max_tokens=5"),
        ({"noise": 0.0}, "noise=0.0"),
    ],
)
def test_settings_validation(change: dict[str, object], message: str) -> None:
    with pytest.raises(VerifyError, match=message):
        CalibrationSettings(**change)  # type: ignore[arg-type]


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])  # --out is required
    assert "--out" in capsys.readouterr().err
