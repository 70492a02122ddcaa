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


def test_the_local_run_writes_the_federated_schema(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites, test = _data(tmp_path)
    summary = run_local(_config(tiny_llama, tmp_path), sites, test)
    assert summary.mode == "local" and not summary.secure_agg
    assert [r.aggregated for r in summary.rounds] == [2, 2]
    assert {name: s.rounds_trained for name, s in summary.sites.items()} == {"site-0": 2, "site-1": 2}
    epsilons = [s.epsilon for s in summary.sites.values()]
    assert all(e is not None and 0 < e <= 3.0 for e in epsilons)  # the same budget rule and ledger as a site
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] not in ("eval", "step")] == [
        "start",
        "baseline",
        "round_start",
        "round",
        "round_start",
        "round",
        "done",
    ]
    for r in (1, 2):  # every site's steps of round r, in order, between its round_start and its round line
        start = next(i for i, e in enumerate(events) if e["event"] == "round_start" and e["round"] == r)
        end = next(i for i, e in enumerate(events) if e["event"] == "round" and e["round"] == r)
        assert [f"{e['site']} {e['step']}/{e['steps']}" for e in events[start:end] if e["event"] == "step"] == [
            "site-0 1/2",
            "site-0 2/2",
            "site-1 1/2",
            "site-1 2/2",
        ]
        assert all(e["round"] == r for e in events[start:end] if e["event"] in ("step", "eval"))
    scoring = [(e["round"], e["done"], e["total"]) for e in events if e["event"] == "eval"]
    assert [r for r, _, _ in scoring] == sorted(r for r, _, _ in scoring) and {r for r, _, _ in scoring} == {0, 1, 2}
    assert all(total == 8 for _, _, total in scoring) and [d for r, d, _ in scoring if r == 0][-1] == 8
    # Not a terminal (captured): plain lines, no bars' carriage returns or escape codes.
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert "evaluating before training: 8/8 notes" in out
    assert "site-1 round 2: step 2/2" in out
    assert "round 1/2: training on 2 sites ..." in out and "round 2/2  held-out loss" in out
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["mode"] == "local" and Path(written["adapter"]).is_dir()


def test_a_site_that_fails_fails_the_local_run(tiny_llama: Path, tmp_path: Path) -> None:
    """The operator is the caller: a site's error is raised (and exits with its code), not recorded."""
    sites, test = _data(tmp_path, bad_site=True)
    with pytest.raises(DataError, match=r"site-1\.jsonl"):
        run_local(_config(tiny_llama, tmp_path), sites, test, echo=False)
