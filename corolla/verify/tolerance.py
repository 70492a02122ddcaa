"""How two honest runs of the same span work may differ, and whether two outputs agree.

Two honest servers never return bit-identical outputs: compute dtypes (float32, bfloat16,
float16), weight quantization (int8, nf4) and even batch composition (matmul blocking
changes the order of additions) all change the rounding. A spot check therefore compares
the primary's output with the check's by

- relative L2 error, ||a - b|| / max(||b||, tiny), computed in float64, and
- largest element difference, max |a - b|,

and calls them in agreement when both are within a `Tolerance`. The tolerances ship in
`corolla/verify/data/tolerances.json`, made by `platform audit calibrate`
(`corolla/platform/calibration.py` runs the measurements; `Disagreements.table` below turns
them into a table): per precision pair and work kind, a safety factor times the largest
honest disagreement measured, with a floor, checked to sit below the disagreement that
corrupted outputs cause. A mixed pair gets the looser of its two precisions' tolerances
(each precision's own tolerance is measured against float32). `load_table(FILE)` reads a
table calibrated for another model (`platform audit calibrate --model DIR --out FILE`), as
`platform train` and `platform generate` do with `--tolerances FILE`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from corolla.verify.errors import VerifyError
from corolla.verify.events import Comparison, Work

__all__ = [
    "PRECISIONS",
    "Disagreements",
    "Margins",
    "Precision",
    "Tolerance",
    "ToleranceEntry",
    "ToleranceTable",
    "compare",
    "load_table",
    "pair_key",
    "parse_table",
    "row_metrics",
    "tolerance_for",
]

Precision = Literal["float32", "bfloat16", "float16", "int8", "nf4"]  # compute dtype or weight quantization
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

TABLE_FORMAT: Literal["corolla-tolerances/1"] = "corolla-tolerances/1"
_SATURATED = sys.float_info.max  # stands for "infinite": JSON, and so the ledger's hash, has no infinity
_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True, kw_only=True, slots=True)
class Tolerance:
    rel_l2: float  # largest ||a - b|| / ||b|| still in agreement
    max_abs: float  # largest max |a - b| still in agreement, in the output's units

    def __post_init__(self) -> None:
        for name in ("rel_l2", "max_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise VerifyError(f"{name}={value!r} must be a finite number > 0")


def compare(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> Comparison:
    """`a` (the primary's output) against `b` (the check's), in float64.

    Any NaN or infinity in either tensor disagrees; both figures then saturate at the largest
    float (so the event still hashes as JSON). Raises `VerifyError` when the shapes differ.
    """
    if a.shape != b.shape:
        raise VerifyError(f"cannot compare outputs of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.is_complex() or b.is_complex():
        raise VerifyError("cannot compare complex tensors")
    a64 = a.detach().to(device="cpu", dtype=torch.float64)
    b64 = b.detach().to(device="cpu", dtype=torch.float64)
    if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):
        return Comparison(rel_l2=_SATURATED, max_abs=_SATURATED, agree=False)
    if a64.numel() == 0:
        return Comparison(rel_l2=0.0, max_abs=0.0, agree=True)
    diff = a64 - b64
    rel_l2 = min(float(torch.linalg.vector_norm(diff)) / max(float(torch.linalg.vector_norm(b64)), _TINY), _SATURATED)
    max_abs = float(diff.abs().max())
    return Comparison(rel_l2=rel_l2, max_abs=max_abs, agree=rel_l2 <= tol.rel_l2 and max_abs <= tol.max_abs)


# -- the calibration table --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ToleranceEntry(_Strict):
    """One (precision pair, work): the tolerance, and the measurements it was set from."""

    rel_l2: float = Field(gt=0, allow_inf_nan=False)
    max_abs: float = Field(gt=0, allow_inf_nan=False)
    honest_max_rel_l2: float = Field(ge=0, allow_inf_nan=False)  # largest honest disagreement for this pair
    honest_max_abs: float = Field(ge=0, allow_inf_nan=False)
    honest_comparisons: int = Field(ge=0)
    # corruption kind -> smallest disagreement a corrupted primary caused against an honest check
    corruption_min_rel_l2: dict[str, float] = Field(default_factory=dict)
    corruption_min_max_abs: dict[str, float] = Field(default_factory=dict)
    # corruption kind -> fraction of corrupted outputs that still agreed within this tolerance
    corruption_undetected: dict[str, float] = Field(default_factory=dict)


class ToleranceTable(_Strict):
    format: Literal["corolla-tolerances/1"] = TABLE_FORMAT
    settings: dict[str, JsonValue]  # how the calibration ran (models, samples, safety factor, floors)
    per_precision: dict[str, dict[Work, dict[str, float]]]  # each precision against float32: raw maxima
    tolerances: dict[str, dict[Work, ToleranceEntry]]  # pair_key(a, b) -> work -> entry


def pair_key(precision_a: str, precision_b: str) -> str:
    """The table's key for a pair, order-free: "bfloat16/float32" for either order."""
    for precision in (precision_a, precision_b):
        if precision not in PRECISIONS:
            raise VerifyError(f"precision {precision!r} is not known; allowed: {', '.join(PRECISIONS)}")
    return "/".join(sorted((precision_a, precision_b)))


def load_table(path: str | Path | None = None) -> ToleranceTable:
    """The shipped table, or one written by the calibration for another model (`--tolerances
    FILE`). Raises VerifyError, naming the file, when it cannot be read or is not a table."""
    if path is None:
        return _shipped_table()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise VerifyError(f"cannot read the tolerance table {path}: {why}") from None
    return parse_table(text, where=str(path))


def parse_table(text: str | bytes, *, where: str) -> ToleranceTable:
    """A tolerance table from its JSON (a file, or a coordinator's train message); `where`
    names the source in the VerifyError raised when it is not a valid table."""
    try:
        return ToleranceTable.model_validate_json(text)
    except ValidationError as exc:
        first, count = exc.errors()[0], exc.error_count()
        at = ".".join(str(part) for part in first["loc"])
        raise VerifyError(
            f"{where} is not a valid tolerance table ({count} error{'s' if count > 1 else ''}; first: "
            f"{at + ': ' if at else ''}{first['msg']})"
        ) from None


def tolerance_for(
    precision_a: str, precision_b: str, work: Work | str, *, table: ToleranceTable | None = None
) -> Tolerance:
    """The tolerance for comparing a `precision_a` server's `work` output with a `precision_b` one's."""
    key = pair_key(precision_a, precision_b)
    try:
        kind = Work(work)
    except ValueError:
        raise VerifyError(f"work {work!r} is not known; allowed: {', '.join(w.value for w in Work)}") from None
    table = table if table is not None else _shipped_table()
    entry = table.tolerances.get(key, {}).get(kind)
    if entry is None:
        raise VerifyError(f"the tolerance table has no entry for {key} {kind.value}; re-run the calibration")
    return Tolerance(rel_l2=entry.rel_l2, max_abs=entry.max_abs)


@cache
def _shipped_table() -> ToleranceTable:
    source = resources.files("corolla.verify").joinpath("data/tolerances.json")
    return parse_table(source.read_text(), where="corolla/verify/data/tolerances.json")


# -- deriving a table from measured disagreements ---------------------------------------------


def row_metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `(B, ...)` tensors: `compare`'s relative L2 and largest difference, (B,) each."""
    a64, b64 = a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1)
    diff = a64 - b64
    rel = torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(b64, dim=1).clamp_min(_TINY)
    return rel.clamp_max(_SATURATED), diff.abs().amax(dim=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Margins:
    """How the largest honest disagreements measured become tolerances."""

    safety_factor: float = 4.0  # tolerance = safety_factor * largest honest disagreement
    rel_l2_floor: float = 1e-4  # smallest tolerance: below it, kernels on other hardware differ
    max_abs_floor: float = 1e-4

    def __post_init__(self) -> None:
        if not self.safety_factor >= 2:
            raise VerifyError(f"safety_factor={self.safety_factor!r} must be >= 2 (the triangle inequality needs 2)")
        for name in ("rel_l2_floor", "max_abs_floor"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise VerifyError(f"{name}={value!r} must be a finite number > 0")


@dataclass(slots=True)
class _Largest:
    rel: float = 0.0
    abs: float = 0.0
    count: int = 0

    def add(self, rel: torch.Tensor, abs_: torch.Tensor) -> None:
        self.rel = max(self.rel, float(rel.max()))
        self.abs = max(self.abs, float(abs_.max()))
        self.count += int(rel.numel())


@dataclass(slots=True)
class Disagreements:
    """Disagreements measured row by row between honest runs, and between corrupted runs and
    honest checks; `table` turns them into a `ToleranceTable`. No I/O: the runs are the
    caller's (`platform audit calibrate`).

    Per work kind, each precision p gets e(p) = the largest disagreement (relative L2 and,
    separately, largest element difference) between a p run and a float32 run (for float32:
    between two float32 runs), and T(p) = max(floor, safety_factor * e(p)). A pair (a, b)
    gets max(T(a), T(b)), and at least safety_factor times the largest disagreement measured
    for that pair directly. Two honest runs differ by at most e(a) + e(b) <= 2 max(e(a), e(b))
    (triangle inequality), so a safety factor of 4 leaves a 2x margin for what was not measured.
    """

    # (work, primary precision, check precision) -> largest honest disagreement
    _honest: dict[tuple[Work, Precision, Precision], _Largest] = field(default_factory=dict, init=False)
    # (work, pair key) -> corruption kind -> every corrupted row's (rel_l2, max_abs), (N, 2) each
    _corrupt: dict[tuple[Work, str], dict[str, list[torch.Tensor]]] = field(default_factory=dict, init=False)

    def add_honest(
        self, work: Work, primary: Precision, check: Precision, out_primary: torch.Tensor, out_check: torch.Tensor
    ) -> None:
        """Two honest runs' `(B, ...)` outputs for the same rows."""
        pair_key(primary, check)  # VerifyError for an unknown precision
        rel, abs_ = row_metrics(out_primary, out_check)
        self._honest.setdefault((work, primary, check), _Largest()).add(rel, abs_)

    def add_corrupted(
        self,
        work: Work,
        corruption: str,
        primary: Precision,
        check: Precision,
        out_primary: torch.Tensor,
        out_check: torch.Tensor,
    ) -> None:
        """A corrupted primary's `(B, ...)` output against an honest check's for the same rows."""
        rel, abs_ = row_metrics(out_primary, out_check)
        kinds = self._corrupt.setdefault((work, pair_key(primary, check)), {})
        kinds.setdefault(corruption, []).append(torch.stack([rel, abs_], dim=1))

    def table(self, margins: Margins, *, settings: Mapping[str, JsonValue]) -> ToleranceTable:
        """The tolerance table (class docstring) for every pair of the precisions measured;
        `settings` (how the measurements ran) is recorded with the margins. Raises VerifyError
        when no float32 run was measured: every tolerance is measured against float32."""
        labels = sorted({p for _, a, b in self._honest for p in (a, b)}, key=PRECISIONS.index)
        if "float32" not in labels:
            raise VerifyError("no float32 run was measured: every precision's tolerance is measured against float32")
        factor = margins.safety_factor
        per_precision: dict[str, dict[Work, dict[str, float]]] = {}
        own: dict[tuple[str, Work], tuple[float, float]] = {}  # T(p): the precision's own tolerance
        for p in labels:
            per_precision[p] = {}
            for work in Work:
                # p against float32 either way round; float32 against float32 (other batch splits)
                found = [h for (w, a, b), h in self._honest.items() if w == work and {a, b} == {p, "float32"}]
                rel = max((h.rel for h in found), default=0.0)
                abs_ = max((h.abs for h in found), default=0.0)
                tol = (max(margins.rel_l2_floor, factor * rel), max(margins.max_abs_floor, factor * abs_))
                own[p, work] = tol
                per_precision[p][work] = {
                    "max_rel_l2_vs_float32": rel,
                    "max_abs_vs_float32": abs_,
                    "comparisons": float(sum(h.count for h in found)),
                    "rel_l2": tol[0],
                    "max_abs": tol[1],
                }
        tolerances: dict[str, dict[Work, ToleranceEntry]] = {}
        for i, a in enumerate(labels):
            for b in labels[i:]:
                key = pair_key(a, b)
                tolerances[key] = {}
                for work in Work:
                    found = [h for (w, x, y), h in self._honest.items() if w == work and pair_key(x, y) == key]
                    honest_rel = max((h.rel for h in found), default=0.0)
                    honest_abs = max((h.abs for h in found), default=0.0)
                    rel_tol = max(own[a, work][0], own[b, work][0], factor * honest_rel)
                    abs_tol = max(own[a, work][1], own[b, work][1], factor * honest_abs)
                    mins_rel, mins_abs, undetected = {}, {}, {}
                    for kind, rows in self._corrupt.get((work, key), {}).items():
                        values = torch.cat(rows)  # (N, 2): rel_l2, max_abs
                        mins_rel[kind] = float(values[:, 0].min())
                        mins_abs[kind] = float(values[:, 1].min())
                        passed = (values[:, 0] <= rel_tol) & (values[:, 1] <= abs_tol)
                        undetected[kind] = float(passed.double().mean())
                    tolerances[key][work] = ToleranceEntry(
                        rel_l2=rel_tol,
                        max_abs=abs_tol,
                        honest_max_rel_l2=honest_rel,
                        honest_max_abs=honest_abs,
                        honest_comparisons=sum(h.count for h in found),
                        corruption_min_rel_l2=mins_rel,
                        corruption_min_max_abs=mins_abs,
                        corruption_undetected=undetected,
                    )
        recorded: dict[str, JsonValue] = {**settings, **asdict(margins)}
        return ToleranceTable(settings=recorded, per_precision=per_precision, tolerances=tolerances)
