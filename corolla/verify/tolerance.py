"""How two honest runs of the same span work may differ, and whether two outputs agree.

Two honest servers never return bit-identical outputs: compute dtypes (float32, bfloat16,
float16), weight quantization (int8, nf4), batch composition (matmul blocking changes the
order of additions) and a cached one-token step against a parallel recompute all change the
rounding. A spot check compares the primary's output `a` with the check's `b` row by row,
a row being one position's vector (the last dimension: a hidden state or its gradient; one
record's adapter gradient; one element of a 1-D tensor), in float64:

- `rel_l2`  = max over rows r of rms(a_r - b_r) / s_r, the per-row relative L2 error;
- `max_abs` = max over rows r of max|a_r - b_r| / s_r, the largest element difference in
  units of its row's scale (the event field keeps its old name so ledgers stay readable);

with s_r = max(rms(b_r), ROW_FLOOR * rms(b)): the reference row's own RMS, floored at a small
fraction of the whole reference's so that an all-zero row (the input gradient of a position
no loss reaches) does not divide by zero. Both figures are scale-free: multiplying both
tensors by c > 0 leaves them unchanged, so one bound serves activations of RMS 0.1 and of RMS
300 (SmolLM2's attention-sink position), and input gradients of any loss scale. Per row, not
over the whole tensor, so a corruption of one position is not diluted by the others, and a
large-magnitude position cannot hide another's error. Outputs agree when both figures are
within a `Tolerance`; any NaN or infinity disagrees.

The tolerances ship in `corolla/verify/data/tolerances.json` (format 2), one entry per
calibrated model (`ModelTolerances`), made by `platform audit calibrate`
(`corolla/platform/calibration.py` measures; `corolla.verify.disagreements` turns the
measurements into an entry). `tolerance_for` picks the entry for a server's model:

1. MODEL: an entry listing the model id's weight fingerprint (the last `-` part of a
   `Checkpoint.model_id`: a hash of its config and weight files);
2. SCALE: otherwise the entries calibrated at the same hidden size (the loosest if several);
3. FALLBACK: otherwise (or when the chosen entry lacks the precision pair), the loosest bound
   any entry has for the pair and work, times the table's `fallback_factor` (2). An unknown
   model is still audited (never silently trusted), against bounds wider than every honest
   disagreement measured on any calibrated model, and a quarantine on such weak evidence
   needs gross or repeated FAILs (`reputation.py`), so an honest server of a model like the
   calibrated ones is not accused; a model unlike them all should be calibrated
   (`platform audit calibrate --model DIR --add-to TABLE`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from enum import StrEnum
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
    "ROW_FLOOR",
    "TABLE_FORMAT",
    "Match",
    "ModelTolerances",
    "Precision",
    "Tolerance",
    "ToleranceEntry",
    "ToleranceTable",
    "compare",
    "fingerprint_of",
    "load_table",
    "pair_key",
    "parse_table",
    "row_metrics",
    "tolerance_for",
]

Precision = Literal["float32", "bfloat16", "float16", "int8", "nf4"]  # compute dtype or weight quantization
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

TABLE_FORMAT: Literal["corolla-tolerances/2"] = "corolla-tolerances/2"
ROW_FLOOR = 1e-3  # a row's scale is at least this fraction of the whole reference's RMS
_SATURATED = sys.float_info.max  # stands for "infinite": JSON, and so the ledger's hash, has no infinity
_TINY = torch.finfo(torch.float64).tiny


class Match(StrEnum):
    """How a tolerance was found for a model (module docstring)."""

    MODEL = "model"  # an entry calibrated on these very weights
    SCALE = "scale"  # an entry calibrated at the same hidden size
    FALLBACK = "fallback"  # no entry fits: the loosest known bound, widened


@dataclass(frozen=True, kw_only=True, slots=True)
class Tolerance:
    rel_l2: float  # largest per-row relative L2 error still in agreement
    max_abs: float  # largest per-row max |a - b| / row scale still in agreement
    match: Match = Match.MODEL  # how the bound was found for the model

    def __post_init__(self) -> None:
        for name in ("rel_l2", "max_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise VerifyError(f"{name}={value!r} must be a finite number > 0")


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64 on the CPU as (rows, last dim); a 0-D or 1-D tensor is one element per row."""
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    return t64.reshape(-1, 1) if t64.dim() < 2 else t64.reshape(-1, t64.shape[-1])


def _per_row(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, D) float64 each -> per-row (relative L2, scaled largest difference), (rows,) each."""
    diff = a - b
    whole = float(b.pow(2).mean().sqrt()) if b.numel() else 0.0
    scale = b.pow(2).mean(dim=1).sqrt().clamp_min(max(ROW_FLOOR * whole, _TINY))
    rel = diff.pow(2).mean(dim=1).sqrt() / scale
    mx = diff.abs().amax(dim=1) / scale
    return rel.nan_to_num(_SATURATED).clamp_max(_SATURATED), mx.nan_to_num(_SATURATED).clamp_max(_SATURATED)


def compare(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> Comparison:
    """`a` (the primary's output) against `b` (the check's): the module docstring's figures.

    Any NaN or infinity in either tensor disagrees; both figures then saturate at the largest
    float (so the event still hashes as JSON). Raises `VerifyError` when the shapes differ.
    """
    if a.shape != b.shape:
        raise VerifyError(f"cannot compare outputs of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.is_complex() or b.is_complex():
        raise VerifyError("cannot compare complex tensors")
    a64, b64 = _as_rows(a), _as_rows(b)
    if not (bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())):
        return Comparison(rel_l2=_SATURATED, max_abs=_SATURATED, agree=False)
    if a64.numel() == 0:
        return Comparison(rel_l2=0.0, max_abs=0.0, agree=True)
    rel, mx = _per_row(a64, b64)
    rel_l2, max_abs = float(rel.max()), float(mx.max())
    return Comparison(rel_l2=rel_l2, max_abs=max_abs, agree=rel_l2 <= tol.rel_l2 and max_abs <= tol.max_abs)


def row_metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row of `(B, ...)` tensors: what `compare` would report for that row alone
    (the row floor taken over the whole batch, as an audit of the batch would), (B,) each."""
    batch = a.shape[0]
    rel, mx = _per_row(_as_rows(a.reshape(batch, -1, *a.shape[2:])), _as_rows(b.reshape(batch, -1, *b.shape[2:])))
    return rel.view(batch, -1).amax(dim=1), mx.view(batch, -1).amax(dim=1)


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


class ModelTolerances(_Strict):
    """The tolerances calibrated on one model (or one family of tiny models)."""

    fingerprints: list[str] = Field(default_factory=list)  # weight fingerprints of the models measured
    hidden_sizes: list[int] = Field(min_length=1)  # widths measured: the scale this entry stands for
    settings: dict[str, JsonValue]  # how the calibration ran (models, samples, safety factor, floors)
    per_precision: dict[str, dict[Work, dict[str, float]]]  # each precision against float32: raw maxima
    tolerances: dict[str, dict[Work, ToleranceEntry]]  # pair_key(a, b) -> work -> entry


class ToleranceTable(_Strict):
    format: Literal["corolla-tolerances/2"] = TABLE_FORMAT
    models: dict[str, ModelTolerances] = Field(min_length=1)  # entry name -> its tolerances
    fallback_factor: float = Field(default=2.0, ge=1, allow_inf_nan=False)  # widening for a model without entry

    def entry(self, model_id: str | None, hidden_size: int | None) -> tuple[Match, list[ModelTolerances]]:
        """The entries that apply to a model (module docstring): by fingerprint, else by width,
        else every entry (FALLBACK)."""
        if model_id:
            fingerprint = fingerprint_of(model_id)
            exact = [m for m in self.models.values() if fingerprint in m.fingerprints]
            if exact:
                return Match.MODEL, exact
        if hidden_size is not None:
            scale = [m for m in self.models.values() if hidden_size in m.hidden_sizes]
            if scale:
                return Match.SCALE, scale
        return Match.FALLBACK, list(self.models.values())


def fingerprint_of(model_id: str) -> str:
    """The weight fingerprint of a `Checkpoint.model_id` ("<dir name>-<12 hex>"): its last part."""
    return model_id.rsplit("-", 1)[-1]


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
    names the source in the VerifyError raised when it is not a valid table. A format-1 table
    (absolute largest-difference bounds, superseded) is refused with its own message."""
    try:
        return ToleranceTable.model_validate_json(text)
    except ValidationError as exc:
        if _format_of(text) == "corolla-tolerances/1":
            raise VerifyError(
                f"{where} is a format-1 tolerance table (absolute bounds in one model's units, superseded by "
                "format 2's scale-free ones); re-run `platform audit calibrate`"
            ) from None
        first, count = exc.errors()[0], exc.error_count()
        at = ".".join(str(part) for part in first["loc"])
        raise VerifyError(
            f"{where} is not a valid tolerance table ({count} error{'s' if count > 1 else ''}; first: "
            f"{at + ': ' if at else ''}{first['msg']})"
        ) from None


def _format_of(text: str | bytes) -> object:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get("format") if isinstance(data, dict) else None


def tolerance_for(
    precision_a: str,
    precision_b: str,
    work: Work | str,
    *,
    table: ToleranceTable | None = None,
    model_id: str | None = None,
    hidden_size: int | None = None,
) -> Tolerance:
    """The tolerance for comparing a `precision_a` server's `work` output with a `precision_b`
    one's, for the model `model_id` of width `hidden_size` (module docstring: MODEL, SCALE or
    FALLBACK; with neither given, FALLBACK). Raises VerifyError when no entry has the pair."""
    key = pair_key(precision_a, precision_b)
    try:
        kind = Work(work)
    except ValueError:
        raise VerifyError(f"work {work!r} is not known; allowed: {', '.join(w.value for w in Work)}") from None
    table = table if table is not None else _shipped_table()
    match, entries = table.entry(model_id, hidden_size)
    found = [e for m in entries if (e := m.tolerances.get(key, {}).get(kind)) is not None]
    widen = 1.0
    if not found or match == Match.FALLBACK:
        match, widen = Match.FALLBACK, table.fallback_factor
        found = [e for m in table.models.values() if (e := m.tolerances.get(key, {}).get(kind)) is not None]
    if not found:
        raise VerifyError(f"the tolerance table has no entry for {key} {kind.value}; re-run the calibration")
    return Tolerance(
        rel_l2=widen * max(e.rel_l2 for e in found), max_abs=widen * max(e.max_abs for e in found), match=match
    )


@cache
def _shipped_table() -> ToleranceTable:
    source = resources.files("corolla.verify").joinpath("data/tolerances.json")
    return parse_table(source.read_text(), where="corolla/verify/data/tolerances.json")
