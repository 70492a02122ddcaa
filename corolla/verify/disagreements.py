"""Measured disagreements become a model's tolerances (the maths of the calibration; no I/O).

The runs are the caller's (`platform audit calibrate`, `corolla/platform/calibration.py`);
figures are `tolerance.row_metrics`' scale-free per-row ones.

Per work kind, each precision p gets e(p) = the largest disagreement (relative L2 and,
separately, the scaled largest difference) between a p run and a float32 run (for float32:
between two float32 runs), and T(p) = max(floor, safety_factor * e(p)). A pair (a, b) gets
max(T(a), T(b)), and at least safety_factor times the largest disagreement measured for
that pair directly. Two honest runs differ by at most e(a) + e(b) <= 2 max(e(a), e(b))
(triangle inequality), so a safety factor of 4 leaves a 2x margin for what was not measured.

The cached-step gap. An inference audit compares a server's cached one-token step with a
check server's parallel recompute of the same position. On one server the two differ
(different matmul shapes sum in a different order): g(p), the step gap, measured between a p
server's cached steps and its own parallel forward. A p step against a q recompute then
differs by at most g(p) + d(p, q), d the parallel-forward disagreement measured for the pair,
so the inference tolerance of a pair is also at least safety_factor * (max(g(a), g(b)) + d(a, b)).
(So an inference bound of a pair (p, p) can be below that of (p, float32): the latter carries
the larger d. Forward and backward bounds of a mixed pair are never below its precisions' own.)
For float32 on SmolLM2 (30 blocks) g is ~3e-6 relative L2 and ~3e-5 scaled largest
difference: far below the floors, which are there for it and for kernels on other hardware.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from pydantic import JsonValue

from corolla.verify.errors import VerifyError
from corolla.verify.events import Work
from corolla.verify.tolerance import PRECISIONS, ModelTolerances, Precision, ToleranceEntry, pair_key, row_metrics

__all__ = ["Disagreements", "Margins"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Margins:
    """How the largest honest disagreements measured become tolerances."""

    safety_factor: float = 4.0  # tolerance = safety_factor * largest honest disagreement
    rel_l2_floor: float = 1e-4  # smallest relative L2 tolerance: below it, kernels on other hardware differ
    max_abs_floor: float = 1e-3  # smallest scaled largest-difference tolerance (a thousandth of a row's RMS)

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


def _largest(found: Sequence[_Largest]) -> tuple[float, float, int]:
    return (
        max((h.rel for h in found), default=0.0),
        max((h.abs for h in found), default=0.0),
        sum(h.count for h in found),
    )


@dataclass(slots=True)
class Disagreements:
    """Disagreements measured row by row between honest runs, between a server's cached steps
    and its own parallel forward, and between corrupted runs and honest checks; `table` turns
    them into a `ModelTolerances` (module docstring)."""

    # (work, primary precision, check precision) -> largest honest disagreement
    _honest: dict[tuple[Work, Precision, Precision], _Largest] = field(default_factory=dict, init=False)
    # precision -> largest gap between its cached steps and its own parallel forward
    _gap: dict[Precision, _Largest] = field(default_factory=dict, init=False)
    # (work, pair key) -> corruption kind -> every corrupted row's (rel_l2, max_abs), (N, 2) each
    _corrupt: dict[tuple[Work, str], dict[str, list[torch.Tensor]]] = field(default_factory=dict, init=False)

    def add_honest(
        self, work: Work, primary: Precision, check: Precision, out_primary: torch.Tensor, out_check: torch.Tensor
    ) -> None:
        """Two honest runs' `(B, ...)` outputs for the same rows."""
        pair_key(primary, check)  # VerifyError for an unknown precision
        rel, abs_ = row_metrics(out_primary, out_check)
        self._honest.setdefault((work, primary, check), _Largest()).add(rel, abs_)

    def add_step_gap(self, precision: Precision, steps: torch.Tensor, parallel: torch.Tensor) -> None:
        """One server's cached one-token step outputs `(B, S, H)` and its own parallel forward's
        outputs at the same positions."""
        pair_key(precision, precision)
        rel, abs_ = row_metrics(steps, parallel)
        self._gap.setdefault(precision, _Largest()).add(rel, abs_)

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

    def table(
        self,
        margins: Margins,
        *,
        settings: Mapping[str, JsonValue],
        hidden_sizes: Sequence[int],
        fingerprints: Sequence[str] = (),
    ) -> ModelTolerances:
        """The tolerances (module docstring) for every pair of the precisions measured, as the
        entry of the models measured (their widths and weight fingerprints); `settings` (how
        the measurements ran) is recorded with the margins. Raises VerifyError when no float32
        run was measured: every tolerance is measured against float32."""
        labels = sorted({p for _, a, b in self._honest for p in (a, b)}, key=PRECISIONS.index)
        if "float32" not in labels:
            raise VerifyError("no float32 run was measured: every precision's tolerance is measured against float32")
        factor = margins.safety_factor
        floors = (margins.rel_l2_floor, margins.max_abs_floor)
        per_precision: dict[str, dict[Work, dict[str, float]]] = {}
        own: dict[tuple[str, Work], tuple[float, float]] = {}  # T(p): the precision's own tolerance
        for p in labels:
            per_precision[p] = {}
            for work in Work:
                # p against float32 either way round; float32 against float32 (other batch splits)
                rel, abs_, count = _largest(
                    [h for (w, a, b), h in self._honest.items() if w == work and {a, b} == {p, "float32"}]
                )
                tol = (max(floors[0], factor * rel), max(floors[1], factor * abs_))
                own[p, work] = tol
                per_precision[p][work] = {
                    "max_rel_l2_vs_float32": rel,
                    "max_abs_vs_float32": abs_,
                    "comparisons": float(count),
                    "rel_l2": tol[0],
                    "max_abs": tol[1],
                }
            gap = self._gap.get(p)
            if gap is not None:
                per_precision[p][Work.INFERENCE].update(step_gap_rel_l2=gap.rel, step_gap_max_abs=gap.abs)
        tolerances: dict[str, dict[Work, ToleranceEntry]] = {}
        for i, a in enumerate(labels):
            for b in labels[i:]:
                key = pair_key(a, b)
                tolerances[key] = {}
                forward_rel, forward_abs, _ = _largest(
                    [h for (w, x, y), h in self._honest.items() if w == Work.FORWARD and pair_key(x, y) == key]
                )
                for work in Work:
                    honest_rel, honest_abs, count = _largest(
                        [h for (w, x, y), h in self._honest.items() if w == work and pair_key(x, y) == key]
                    )
                    rel_tol = max(own[a, work][0], own[b, work][0], factor * honest_rel)
                    abs_tol = max(own[a, work][1], own[b, work][1], factor * honest_abs)
                    if work == Work.INFERENCE:  # the step-gap model: g(p) + d(p, q)
                        gaps = [g for p in (a, b) if (g := self._gap.get(p)) is not None]
                        gap_rel, gap_abs, _ = _largest(gaps)
                        rel_tol = max(rel_tol, factor * (gap_rel + forward_rel))
                        abs_tol = max(abs_tol, factor * (gap_abs + forward_abs))
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
                        honest_comparisons=count,
                        corruption_min_rel_l2=mins_rel,
                        corruption_min_max_abs=mins_abs,
                        corruption_undetected=undetected,
                    )
        recorded: dict[str, JsonValue] = {**settings, **asdict(margins)}
        return ModelTolerances(
            fingerprints=sorted(set(fingerprints)),
            hidden_sizes=sorted(set(hidden_sizes)),
            settings=recorded,
            per_precision=per_precision,
            tolerances=tolerances,
        )
