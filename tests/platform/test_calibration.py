"""The calibration harness (`corolla.platform.calibration`), run small: it covers what the
shipped table covers, and `platform audit calibrate` fails in one line with a stable code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla.inference.models.tiny import TinySpec, init_tiny
from corolla.platform.calibration import CORRUPTIONS, CalibrationError, CalibrationSettings, calibrate, merged
from corolla.platform.cli import main
from corolla.verify.errors import VerifyError
from corolla.verify.events import Work
from corolla.verify.tolerance import Match, ToleranceTable, load_table, tolerance_for

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


def test_a_quick_run_covers_every_entry_of_the_shipped_tiny_entry(quick_table: ToleranceTable) -> None:
    shipped = load_table().models["tiny"]
    (entry_of,) = quick_table.models.values()
    assert list(quick_table.models) == ["tiny"] and entry_of.hidden_sizes == [64] and len(entry_of.fingerprints) == 1
    assert set(entry_of.tolerances) == set(shipped.tolerances)
    for key, works in shipped.tolerances.items():
        assert set(entry_of.tolerances[key]) == set(works)
        for work, entry in entry_of.tolerances[key].items():
            assert entry.honest_comparisons > 0
            assert set(entry.corruption_min_rel_l2) == set(CORRUPTIONS) == set(works[work].corruption_min_rel_l2)
            assert entry.rel_l2 >= QUICK.rel_l2_floor and entry.max_abs >= QUICK.max_abs_floor
    assert set(entry_of.per_precision) == set(shipped.per_precision)
    assert entry_of.settings["samples"] == 1 and entry_of.settings["corruptions"] == list(CORRUPTIONS)
    assert "step_gap_rel_l2" in entry_of.per_precision["float32"][Work.INFERENCE]


def test_a_quick_run_records_the_settings_the_shipped_table_records(quick_table: ToleranceTable) -> None:
    settings = quick_table.models["tiny"].settings
    assert set(settings) == set(load_table().models["tiny"].settings)
    assert settings["safety_factor"] == QUICK.safety_factor


def test_a_quick_run_still_separates_float32_from_gross_corruption(quick_table: ToleranceTable) -> None:
    for work in Work:
        entry = quick_table.models["tiny"].tolerances["float32/float32"][work]
        assert entry.honest_max_rel_l2 < 1e-5
        for kind in CORRUPTIONS:
            assert entry.corruption_undetected[kind] == 0.0
            assert entry.corruption_min_rel_l2[kind] > 10 * entry.rel_l2


def test_the_table_round_trips_and_serves_lookups(quick_table: ToleranceTable, tmp_path: Path) -> None:
    path = tmp_path / "tolerances.json"
    path.write_text(json.dumps(quick_table.model_dump(mode="json")))
    loaded = load_table(path)
    assert loaded == quick_table
    tol = tolerance_for("int8", "bfloat16", Work.BACKWARD, table=loaded, hidden_size=64)
    assert tol.rel_l2 == quick_table.models["tiny"].tolerances["bfloat16/int8"][Work.BACKWARD].rel_l2
    assert tol.match == Match.SCALE


def test_merged_adds_an_entry_and_replaces_one_of_the_same_name(quick_table: ToleranceTable) -> None:
    shipped = load_table()
    both = merged(shipped, quick_table.model_copy(update={"models": {"other": quick_table.models["tiny"]}}))
    assert set(both.models) == {*shipped.models, "other"}
    replaced = merged(shipped, quick_table)
    assert replaced.models["tiny"] == quick_table.models["tiny"] and set(replaced.models) == set(shipped.models)


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


def test_a_model_of_one_block_cannot_be_calibrated(tmp_path: Path) -> None:
    one = init_tiny(tmp_path / "one", TinySpec(arch="llama", hidden_size=64, num_layers=1))
    with pytest.raises(CalibrationError, match="1 block"):
        calibrate(CalibrationSettings(model=one, samples=1))


# -- platform audit calibrate ------------------------------------------------------------------


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """The command sets torch's thread count for the process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "calibrate"])  # --out is required
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "0"], "argument --samples: 0 must be >= 1"),
        (["--threads", "two"], "argument --threads: 'two' is not an integer"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "calibrate", "--out", str(tmp_path / "t.json"), *flags])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(("platform audit calibrate: error: ", "platform: error: ")) and message in last


def test_a_bad_model_directory_exits_4_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_threads: None
) -> None:
    (tmp_path / "empty").mkdir()
    for model, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "has no config.json")):
        out = tmp_path / "t.json"
        assert main(["audit", "calibrate", "--model", str(model), "--out", str(out), "--samples", "1"]) == 4
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("platform audit: ") and why in line
        assert not out.exists()


def test_an_unusable_out_exits_13_before_measuring(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "calibrate", "--model", str(tiny_llama), "--out", str(tmp_path)]) == 13
    captured = capsys.readouterr()
    assert captured.err.strip() == f"platform audit: --out {tmp_path} is a directory; give a file name"
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["audit", "calibrate", "--out", str(blocker / "t.json")]) == 13
    assert "cannot create the directory of --out" in capsys.readouterr().err


def test_a_tiny_run_writes_a_table_load_table_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_threads: None
) -> None:
    model = init_tiny(tmp_path / "tiny", TinySpec(arch="llama", hidden_size=64, num_layers=2))
    out = tmp_path / "out" / "tolerances.json"
    capsys.readouterr()  # init_tiny's progress bar
    assert main(["audit", "calibrate", "--model", str(model), "--out", str(out), "--samples", "1"]) == 0
    table = load_table(out)
    shipped = load_table().models["tiny"]
    (name, entry_of) = next(iter(table.models.items()))
    assert name == "tiny" and entry_of.hidden_sizes == [64]  # the directory's name
    assert set(entry_of.tolerances) == set(shipped.tolerances)
    assert entry_of.settings["model"] == str(model) and entry_of.settings["samples"] == 1
    for works in entry_of.tolerances.values():
        assert set(works) == set(Work)
        assert all(set(e.corruption_min_rel_l2) == set(CORRUPTIONS) for e in works.values())
    captured = capsys.readouterr()
    progress = captured.err.strip().splitlines()
    assert progress[0].startswith(f"calibrating on {model}: 1 sample(s)")
    assert any(line.startswith("checkpoint 1/1: ") for line in progress)
    assert any("sample 1/1: 8 rows" in line for line in progress)
    assert (
        captured.out.strip()
        .splitlines()[-1]
        .startswith(f"wrote the tolerance table to {out}: 1 model entry, 15 precision pairs")
    )
    assert [p.name for p in out.parent.iterdir()] == ["tolerances.json"]  # no temporary file left
