"""`platform train --in-process`: the round loop on an in-process grid, sites in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corolla.federation.local import run_local
from corolla.training.clinical import synthetic_clinical
from corolla.training.config import TrainConfig
from corolla.training.data import DataError, Record, write_jsonl


def _data(tmp_path: Path, *, bad_site: bool = False) -> tuple[list[Path], Path]:
    data = synthetic_clinical(sites=2, records_per_site=24, test_records=8, seed=5)
    paths = []
    for i, records in enumerate(data.sites):
        if bad_site and i == 1:
            records = [*records, Record(prompt="x " * 2000, completion="y")]  # longer than max_length
        write_jsonl(records, tmp_path / f"site-{i}.jsonl")
        paths.append(tmp_path / f"site-{i}.jsonl")
    write_jsonl(data.test, tmp_path / "test.jsonl")
    return paths, tmp_path / "test.jsonl"


def _config(tiny_llama: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig(model=str(tiny_llama), out_dir=str(tmp_path / "out"), rounds=2, steps_per_round=2, batch_size=8)


def test_the_local_run_writes_the_federated_schema(tiny_llama: Path, tmp_path: Path) -> None:
    sites, test = _data(tmp_path)
    summary = run_local(_config(tiny_llama, tmp_path), sites, test, echo=False)
    assert summary.mode == "local" and not summary.secure_agg
    assert [r.aggregated for r in summary.rounds] == [2, 2]
    assert {name: s.rounds_trained for name, s in summary.sites.items()} == {"site-0": 2, "site-1": 2}
    epsilons = [s.epsilon for s in summary.sites.values()]
    assert all(e is not None and 0 < e <= 3.0 for e in epsilons)  # the same budget rule and ledger as a site
    events = [json.loads(line)["event"] for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert events == ["start", "baseline", "round", "round", "done"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["mode"] == "local" and Path(written["adapter"]).is_dir()


def test_a_site_that_fails_fails_the_local_run(tiny_llama: Path, tmp_path: Path) -> None:
    """The operator is the caller: a site's error is raised (and exits with its code), not recorded."""
    sites, test = _data(tmp_path, bad_site=True)
    with pytest.raises(DataError, match=r"site-1\.jsonl"):
        run_local(_config(tiny_llama, tmp_path), sites, test, echo=False)
