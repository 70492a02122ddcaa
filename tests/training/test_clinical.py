"""The synthetic clinical-notes dataset: deterministic, non-IID across sites, a disjoint test split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from corolla.training.clinical import LABELS, synthetic_clinical
from corolla.training.data import DataError, Record, write_jsonl


def _jsonl_bytes(path: Path, seed: int) -> bytes:
    data = synthetic_clinical(sites=3, records_per_site=50, test_records=16, seed=seed)
    write_jsonl([*data.train, *data.test], path)
    return path.read_bytes()


def test_same_seed_gives_byte_identical_data(tmp_path: Path) -> None:
    first = _jsonl_bytes(tmp_path / "first.jsonl", seed=0)
    assert _jsonl_bytes(tmp_path / "second.jsonl", seed=0) == first
    assert _jsonl_bytes(tmp_path / "other.jsonl", seed=1) != first


def test_records_are_notes_ending_in_a_diagnosis() -> None:
    data = synthetic_clinical(sites=2, records_per_site=20, test_records=8, seed=0)
    assert data.labels == LABELS
    assert 6 <= len(data.labels) <= 8
    assert [len(site) for site in data.sites] == [20, 20]
    for record in [*data.train, *data.test]:
        assert record.prompt.startswith("Patient: ")
        assert record.prompt.endswith(" Diagnosis:")
        assert "Symptoms: " in record.prompt and "Findings: " in record.prompt
        assert record.completion.startswith(" ")
        assert record.completion[1:] in data.labels


def _distribution(records: tuple[Record, ...], labels: tuple[str, ...]) -> list[float]:
    counts = Counter(r.completion.strip() for r in records)
    return [counts[label] / len(records) for label in labels]


def test_sites_have_different_case_mixes_but_see_most_labels() -> None:
    data = synthetic_clinical(sites=4, records_per_site=800, test_records=0, seed=0)
    mixes = [_distribution(site, data.labels) for site in data.sites]
    for i in range(len(mixes)):
        assert sum(p > 0 for p in mixes[i]) >= len(data.labels) - 2
        for j in range(i):
            total_variation = sum(abs(a - b) for a, b in zip(mixes[i], mixes[j], strict=True)) / 2
            assert total_variation > 0.1, (i, j, total_variation)


def test_more_concentration_means_more_alike_sites() -> None:
    def spread(concentration: float) -> float:
        data = synthetic_clinical(sites=4, records_per_site=800, test_records=0, seed=0, concentration=concentration)
        mixes = [_distribution(site, data.labels) for site in data.sites]
        return max(max(m) - min(m) for m in zip(*mixes, strict=True))

    assert spread(1000.0) < spread(0.3)


def test_test_split_is_balanced_and_disjoint_from_training() -> None:
    data = synthetic_clinical(sites=3, records_per_site=400, test_records=80, seed=2)
    counts = Counter(r.completion.strip() for r in data.test)
    assert set(counts.values()) == {80 // len(data.labels)}
    assert not {r.prompt for r in data.test} & {r.prompt for r in data.train}
    assert len({r.prompt for r in data.test}) == len(data.test)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 0}, "sites=0"),
        ({"records_per_site": 0}, "records_per_site=0"),
        ({"test_records": -1}, "test_records=-1"),
        ({"concentration": 0.0}, "concentration=0.0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"sites": 2, "records_per_site": 3, "test_records": 2, **kwargs}
    with pytest.raises(DataError, match=message):
        synthetic_clinical(**args)  # type: ignore[arg-type]
