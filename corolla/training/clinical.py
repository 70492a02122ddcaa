"""A deterministic synthetic clinical-notes dataset: classify a short note by its diagnosis.

Each note lists a patient's age and sex, a few symptoms and a few findings, and ends with
`Diagnosis:`; the completion is `" " + label`. Every diagnosis has its own symptoms and
findings, some of which it shares with other diagnoses (fever, shortness of breath,
headache ...), and every note may carry label-independent noise terms, so the task is
learnable but not solvable from a single word.

Sites are non-IID: each draws its case mix from a Dirichlet distribution over the labels
(`concentration` small = skewed). The held-out test split is balanced across labels and
shares no prompt with any site. Everything comes from `random.Random(seed)`, so the same
arguments give byte-identical records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from corolla.training.data import DataError, Record


@dataclass(frozen=True, kw_only=True, slots=True)
class _Diagnosis:
    label: str
    symptoms: tuple[str, ...]  # a note takes 2-3 of these
    findings: tuple[str, ...]  # and 1-2 of these


_DIAGNOSES: tuple[_Diagnosis, ...] = (
    _Diagnosis(
        label="pneumonia",
        symptoms=("fever", "productive cough", "shortness of breath", "pleuritic chest pain", "chills"),
        findings=("crackles in right lower lobe", "consolidation on chest radiograph", "low oxygen saturation"),
    ),
    _Diagnosis(
        label="myocardial infarction",
        symptoms=("chest pain radiating to left arm", "sweating", "nausea", "shortness of breath", "jaw pain"),
        findings=("ST elevation in inferior leads", "raised troponin", "low blood pressure"),
    ),
    _Diagnosis(
        label="meningitis",
        symptoms=("headache", "neck stiffness", "fever", "photophobia", "vomiting"),
        findings=("rash that does not blanch", "positive Kernig sign", "cloudy spinal fluid"),
    ),
    _Diagnosis(
        label="asthma",
        symptoms=("wheeze", "cough at night", "shortness of breath", "chest tightness", "worse with exercise"),
        findings=("wheeze on auscultation", "low peak flow", "reversible obstruction on spirometry"),
    ),
    _Diagnosis(
        label="diabetes mellitus",
        symptoms=("thirst", "frequent urination", "weight loss", "blurred vision", "fatigue"),
        findings=("high fasting glucose", "glucose in urine", "raised HbA1c"),
    ),
    _Diagnosis(
        label="appendicitis",
        symptoms=("pain in right lower abdomen", "fever", "loss of appetite", "nausea", "vomiting"),
        findings=("tenderness in right iliac fossa", "rebound tenderness", "raised white cell count"),
    ),
    _Diagnosis(
        label="stroke",
        symptoms=("sudden weakness of right arm", "facial droop", "slurred speech", "confusion", "headache"),
        findings=("weakness of one side", "infarct on CT scan", "high blood pressure"),
    ),
    _Diagnosis(
        label="urinary tract infection",
        symptoms=("burning on urination", "frequent urination", "lower abdominal pain", "fever", "back pain"),
        findings=("nitrites on dipstick", "white cells in urine", "suprapubic tenderness"),
    ),
)

LABELS: tuple[str, ...] = tuple(d.label for d in _DIAGNOSES)

# Terms any note may carry, whatever its diagnosis.
_NOISE_SYMPTOMS = ("fatigue", "dizziness", "poor sleep", "anxiety", "mild cough", "nausea")
_NOISE_FINDINGS = ("mild dehydration", "normal heart sounds", "history of smoking", "obesity", "pulse 96")

_MAX_REDRAWS = 1000  # per test record, to avoid a prompt that a site already holds


@dataclass(frozen=True, kw_only=True, slots=True)
class ClinicalData:
    sites: tuple[tuple[Record, ...], ...]  # one tuple of training records per site
    test: tuple[Record, ...]  # held out: balanced across labels, no prompt shared with a site
    labels: tuple[str, ...]  # every record's completion is " " + one of these

    @property
    def train(self) -> tuple[Record, ...]:
        """Every site's records, site after site."""
        return tuple(r for site in self.sites for r in site)


def synthetic_clinical(
    *, sites: int, records_per_site: int, test_records: int, seed: int = 0, concentration: float = 1.0
) -> ClinicalData:
    """Generate `sites` non-IID training sets and a balanced test set from `seed`."""
    for name, value, least in (("sites", sites, 1), ("records_per_site", records_per_site, 1)):
        if value < least:
            raise DataError(f"{name}={value} must be at least {least}")
    if test_records < 0:
        raise DataError(f"test_records={test_records} must be at least 0")
    if not concentration > 0:
        raise DataError(f"concentration={concentration} must be positive")

    rng = random.Random(seed)
    site_records: list[tuple[Record, ...]] = []
    for _ in range(sites):
        mix = _dirichlet(rng, concentration, len(_DIAGNOSES))
        site_rng = random.Random(rng.getrandbits(64))
        chosen = site_rng.choices(_DIAGNOSES, weights=mix, k=records_per_site)
        site_records.append(tuple(_note(site_rng, d) for d in chosen))

    seen = {r.prompt for site in site_records for r in site}
    test_rng = random.Random(rng.getrandbits(64))
    balanced = [_DIAGNOSES[i % len(_DIAGNOSES)] for i in range(test_records)]
    test_rng.shuffle(balanced)
    test: list[Record] = []
    for diagnosis in balanced:
        for _ in range(_MAX_REDRAWS):
            record = _note(test_rng, diagnosis)
            if record.prompt not in seen:
                break
        else:
            raise DataError(f"could not draw a test note for {diagnosis.label!r} unlike every training note")
        seen.add(record.prompt)
        test.append(record)
    return ClinicalData(sites=tuple(site_records), test=tuple(test), labels=LABELS)


def _dirichlet(rng: random.Random, concentration: float, k: int) -> list[float]:
    draws = [rng.gammavariate(concentration, 1.0) for _ in range(k)]
    total = sum(draws)
    if total == 0:  # every draw underflowed: possible only for tiny concentrations
        return [1.0 / k] * k
    return [d / total for d in draws]


def _note(rng: random.Random, diagnosis: _Diagnosis) -> Record:
    age = rng.randint(18, 90)
    sex = rng.choice(("male", "female"))
    symptoms = rng.sample(diagnosis.symptoms, rng.randint(2, 3))
    findings = rng.sample(diagnosis.findings, rng.randint(1, 2))
    if rng.random() < 0.5:
        symptoms.append(rng.choice([s for s in _NOISE_SYMPTOMS if s not in symptoms]))
    if rng.random() < 0.5:
        findings.append(rng.choice(_NOISE_FINDINGS))
    rng.shuffle(symptoms)
    rng.shuffle(findings)
    prompt = (
        f"Patient: {age}-year-old {sex}. Symptoms: {', '.join(symptoms)}. Findings: {', '.join(findings)}. Diagnosis:"
    )
    return Record(prompt=prompt, completion=f" {diagnosis.label}")
