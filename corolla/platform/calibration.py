"""The calibration harness behind `platform audit calibrate`: how much honest runs disagree, and corrupted ones.

    platform audit calibrate --out corolla/verify/data/tolerances.json
    platform audit calibrate --model DIR --out FILE

It runs the same span of real blocks (`SpanBackend`, as `platform serve` builds it, int8/nf4
through `quantize_linears`) honestly in every way an honest swarm may:

- server setups: compute dtype float32, bfloat16, float16, and int8 / nf4 weights with
  float32 or bfloat16 compute (a precision label does not say the compute dtype, so both
  count under it);
- batch splits: the same rows computed inside a batch of 8, each alone, and in batches of
  3, 3, 2 (matmul blocking, and so rounding, depends on the batch);
- work kinds: `forward` (the span's output), `backward` (the input gradient, for the
  gradient of each row's mean next-token cross-entropy through the model's head: what a
  training client sends) and `inference` (the outputs of cached one-token steps after a
  prefill, against the same positions of a parallel forward of the whole prefix).

Inputs are the real embeddings of random token ids (rows of 8 to 32 tokens), through tiny
random Llama and GPT-2 checkpoints (`init_tiny`: 4 blocks, widths 64 and 128, two weight
seeds; width 64 and seed 0 is the test suite's fixture model), or through the checkpoint
given with `--model` (the whole model as one span). Every output row is compared, with
`tolerance.row_metrics`' scale-free per-position figures, with the same row from every other
(setup, split), in both directions; each setup's cached steps are also compared with its own
parallel forward (the cached-step gap of `corolla.verify.disagreements`).

Then corruptions, each run by the primary in every setup and compared against every honest
check: Gaussian noise of 1% of each row's RMS added to the output (`noise`), one block of
the span skipped (`skip_block`), and blocks of a checkpoint of another seed
(`other_weights`; for `--model`, the span's blocks in rotated order), and the lazy answer,
the input returned unchanged (`identity`; for backward, the output gradient).

The measurements become one entry of a format-2 table (`Disagreements.table`, pure maths):
per pair and work kind the tolerance, max(T(a), T(b)) with T(p) = max(floor, 4 x the largest
disagreement between a p run and a float32 run), at least 4 x the largest disagreement
measured for the pair directly, and for inference at least 4 x (step gap + forward
disagreement); the smallest disagreement each corruption caused, and the fraction of
corrupted outputs that the tolerance would let pass (`corruption_undetected`, 0 means every
one was caught). The entry carries the widths and weight fingerprints measured, by which
`tolerance_for` finds it; `merged` puts entries of several calibrations into one table (the
shipped one holds `tiny` and `smollm2-135m-instruct`). Figures: docs/verification.md.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.family import ClientParts
from corolla.inference.models.tiny import ARCHES, Arch, TinySpec, init_tiny
from corolla.inference.server.backend import SpanBackend
from corolla.inference.server.quantization import QuantMode
from corolla.inference.wire.tensors import DTYPES
from corolla.verify.disagreements import Disagreements, Margins
from corolla.verify.errors import VerifyError
from corolla.verify.events import Work
from corolla.verify.tolerance import PRECISIONS, ModelTolerances, Precision, ToleranceTable, fingerprint_of

__all__ = [
    "CORRUPTIONS",
    "SETUPS",
    "CalibrationError",
    "CalibrationSettings",
    "Corruption",
    "Setup",
    "calibrate",
    "merged",
    "summary",
]

Corruption = Literal["noise", "skip_block", "other_weights", "identity"]
CORRUPTIONS: tuple[Corruption, ...] = get_args(Corruption)
Segments = tuple[tuple[int, int], ...]  # the sub-spans a run chains: one, or two around a skipped block
Progress = Callable[[str], None]


class CalibrationError(VerifyError):
    """The calibration cannot run as asked: bad settings, a model it cannot calibrate, an output it cannot write."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """One honest server configuration, labelled with the precision a `Run` reports."""

    precision: Precision
    dtype: Literal["float32", "bfloat16", "float16"]  # compute dtype
    quant: QuantMode | None = None  # int8 / nf4 weights, or None

    @property
    def name(self) -> str:
        return self.precision if self.quant is None else f"{self.quant}-{self.dtype}"


SETUPS: tuple[Setup, ...] = (
    Setup(precision="float32", dtype="float32"),
    Setup(precision="bfloat16", dtype="bfloat16"),
    Setup(precision="float16", dtype="float16"),
    Setup(precision="int8", dtype="float32", quant="int8"),
    Setup(precision="int8", dtype="bfloat16", quant="int8"),
    Setup(precision="nf4", dtype="float32", quant="nf4"),
    Setup(precision="nf4", dtype="bfloat16", quant="nf4"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationSettings:
    archs: tuple[Arch, ...] = ("llama", "gpt2")  # tiny architectures made with init_tiny
    weight_seeds: tuple[int, ...] = (0, 1)  # one checkpoint per arch, width and seed
    hidden_sizes: tuple[int, ...] = (64, 128)  # tiny model widths (MLP 2x); 64 is the test fixtures' model
    num_layers: int = 4  # blocks in the calibrated span (the whole tiny model)
    samples: int = 2  # input batches per checkpoint
    batch: int = 8  # rows per batch
    splits: tuple[tuple[int, ...], ...] = ((8,), (1, 1, 1, 1, 1, 1, 1, 1), (3, 3, 2))  # batch compositions
    min_tokens: int = 4  # shortest prefill; rows have min_tokens + steps to max_tokens tokens (uniform)
    max_tokens: int = 32
    steps: int = 4  # cached one-token inference steps after the prefill
    safety_factor: float = 4.0  # tolerance = safety_factor * largest honest disagreement
    rel_l2_floor: float = 1e-4  # smallest tolerance: below it, kernels on other hardware differ
    max_abs_floor: float = 1e-3  # in units of a row's RMS (scale-free)
    noise: float = 0.01  # the noise corruption's std, as a fraction of each row's RMS
    seed: int = 0  # token ids, noise and skipped blocks
    model: Path | None = None  # calibrate this checkpoint instead of tiny ones (archs/seeds ignored)
    name: str = ""  # the table entry's name (default: "tiny", or the model directory's name)
    setups: tuple[Setup, ...] = field(default=SETUPS)
    margins: Margins = field(init=False)  # safety_factor and the floors, validated by Margins

    def __post_init__(self) -> None:
        for name in ("num_layers", "samples", "batch", "min_tokens", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"{name}={value!r} must be an integer >= 1")
        if self.num_layers < 2:
            raise CalibrationError(
                f"num_layers={self.num_layers} must be at least 2 (a block is skipped as a corruption)"
            )
        if self.max_tokens < self.min_tokens + self.steps:
            raise CalibrationError(
                f"max_tokens={self.max_tokens} must be at least min_tokens + steps = {self.min_tokens + self.steps}"
            )
        if not self.archs or any(a not in ARCHES for a in self.archs):
            raise CalibrationError(f"archs={self.archs!r} must be a non-empty subset of {ARCHES}")
        if not self.weight_seeds:
            raise CalibrationError("weight_seeds must not be empty")
        if not self.hidden_sizes or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 4 for h in self.hidden_sizes
        ):
            raise CalibrationError(f"hidden_sizes={self.hidden_sizes!r} must be a non-empty tuple of integers >= 4")
        if not self.splits or any(sum(s) != self.batch or min(s) < 1 for s in self.splits):
            raise CalibrationError(f"splits={self.splits!r} must each be positive sizes summing to batch={self.batch}")
        margins = Margins(  # VerifyError for a safety factor under 2 or a floor <= 0
            safety_factor=self.safety_factor, rel_l2_floor=self.rel_l2_floor, max_abs_floor=self.max_abs_floor
        )
        object.__setattr__(self, "margins", margins)  # frozen: the derived field is set once, here
        if not 0 < self.noise < math.inf:
            raise CalibrationError(f"noise={self.noise!r} must be a finite number > 0")
        labels = {s.precision for s in self.setups}
        if "float32" not in labels or not labels <= set(PRECISIONS):
            raise CalibrationError(f"setups must include float32 and use only the precisions {PRECISIONS}")


# -- running the span ---------------------------------------------------------------------------


def _backend(checkpoint: Checkpoint, setup: Setup, start: int, end: int) -> SpanBackend:
    dtype = DTYPES[setup.dtype]
    span = checkpoint.load_span(start, end, dtype=dtype)
    if setup.quant is not None:
        from corolla.inference.server.quantization import quantize_linears  # imports bitsandbytes

        quantize_linears(span, setup.quant, compute_dtype=dtype)
    return SpanBackend(span, model_id="calibration", hidden_size=checkpoint.hidden_size, dtype=dtype, quant=setup.quant)


def _rows(split: Sequence[int]) -> Iterator[slice]:
    start = 0
    for size in split:
        yield slice(start, start + size)
        start += size


def _forward(backend: SpanBackend, hidden: torch.Tensor, segments: Segments) -> torch.Tensor:
    for start, end in segments:
        hidden = backend.forward(hidden, start, end)
    return hidden


def _backward(backend: SpanBackend, hidden: torch.Tensor, grad: torch.Tensor, segments: Segments) -> torch.Tensor:
    inputs = [hidden]
    for start, end in segments[:-1]:
        inputs.append(backend.forward(inputs[-1], start, end).clone())  # a normal tensor, as from the wire
    for (start, end), x in zip(reversed(segments), reversed(inputs), strict=True):
        grad_input = backend.backward(x, grad, start, end).grad_input
        if grad_input is None:
            raise CalibrationError("the backend returned no input gradient")
        grad = grad_input
    return grad


def _steps(backend: SpanBackend, hidden: torch.Tensor, steps: int, segments: Segments) -> torch.Tensor:
    """Prefill all but the last `steps` tokens, then one-token steps: `(B, steps, H)` step outputs."""
    batch, tokens, _ = hidden.shape
    prefill = tokens - steps
    caches = [backend.new_cache(s, e, batch_size=batch, max_length=tokens) for s, e in segments]
    outputs = []
    for position, width in [(0, prefill)] + [(p, 1) for p in range(prefill, tokens)]:
        x = hidden[:, position : position + width]
        for (start, end), cache in zip(segments, caches, strict=True):
            x = backend.step(x, cache=cache, position=position, start=start, end=end)
        if position >= prefill:
            outputs.append(x)
    return torch.cat(outputs, dim=1)


def _split_run(run: Callable[..., torch.Tensor], split: Sequence[int], *tensors: torch.Tensor) -> torch.Tensor:
    """`run(*row_slices)` for each group of rows of `split`, concatenated back into one batch."""
    return torch.cat([run(*(t[rows] for t in tensors)) for rows in _rows(split)], dim=0)


def _grad_output(client: ClientParts, output: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(sum over rows of each row's mean next-token cross-entropy) / d(span output): a client's gradient."""
    with torch.enable_grad():
        out = output.detach().clone().requires_grad_(True)  # a normal tensor: forward ran in inference mode
        logits = client.head(out).float()  # (B, T, V)
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = per_token.view(ids.shape[0], -1).mean(dim=1).sum()
        (grad,) = torch.autograd.grad(loss, out)
    return grad


def _rotated_checkpoint_span(checkpoint: Checkpoint, setup: Setup, n: int) -> SpanBackend:
    """Stand-in for another checkpoint's weights on a given model: its blocks in rotated order."""
    backend = _backend(checkpoint, setup, 0, n)
    blocks = list(backend.span.blocks)
    backend.span.blocks = nn.ModuleList(blocks[1:] + blocks[:1])
    return backend


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Each row's root mean square, shaped to broadcast over the row."""
    return t.pow(2).flatten(1).mean(dim=1).sqrt().view(-1, *([1] * (t.dim() - 1)))


# -- measuring ----------------------------------------------------------------------------------


def _measure_checkpoint(
    checkpoint: Checkpoint,
    other: Checkpoint | None,
    settings: CalibrationSettings,
    gen: torch.Generator,
    m: Disagreements,
    progress: Progress,
) -> None:
    n = checkpoint.num_blocks
    if n < 2:
        raise CalibrationError(f"{checkpoint.path} has {n} block(s); calibration skips one, so it needs at least 2")
    whole: Segments = ((0, n),)
    client = checkpoint.load_client()
    honest = {s: _backend(checkpoint, s, 0, n) for s in settings.setups}
    wrong = {
        s: _backend(other, s, 0, n) if other is not None else _rotated_checkpoint_span(checkpoint, s, n)
        for s in settings.setups
    }
    vocab = int(checkpoint.config.vocab_size)
    reference = next(s for s in settings.setups if s.precision == "float32")
    for sample in range(settings.samples):
        started = time.monotonic()
        tokens = int(torch.randint(settings.min_tokens + settings.steps, settings.max_tokens + 1, (), generator=gen))
        ids = torch.randint(0, vocab, (settings.batch, tokens), generator=gen)
        hidden = client.embed(ids)  # (B, T, H) float32, as a client sends it
        grad = _grad_output(client, honest[reference].forward(hidden, 0, n), ids)
        skipped = int(torch.randint(0, n, (), generator=gen))
        skip: Segments = tuple(seg for seg in ((0, skipped), (skipped + 1, n)) if seg[0] < seg[1])

        fwd: dict[tuple[Setup, int], torch.Tensor] = {}
        bwd: dict[tuple[Setup, int], torch.Tensor] = {}
        stp: dict[tuple[Setup, int], torch.Tensor] = {}
        for setup, backend in honest.items():
            for i, split in enumerate(settings.splits):
                fwd[setup, i] = _split_run(lambda x, b=backend: _forward(b, x, whole), split, hidden)
                bwd[setup, i] = _split_run(lambda x, g, b=backend: _backward(b, x, g, whole), split, hidden, grad)
                stp[setup, i] = _split_run(lambda x, b=backend: _steps(b, x, settings.steps, whole), split, hidden)
        last = slice(tokens - settings.steps, tokens)
        for (sa, ia), out_a in fwd.items():
            m.add_step_gap(sa.precision, stp[sa, ia], out_a[:, last])  # the same server, cached vs parallel
            for (sb, ib), out_b in fwd.items():
                if (sa, ia) != (sb, ib):
                    m.add_honest(Work.FORWARD, sa.precision, sb.precision, out_a, out_b)
                    m.add_honest(Work.BACKWARD, sa.precision, sb.precision, bwd[sa, ia], bwd[sb, ib])
                m.add_honest(Work.INFERENCE, sa.precision, sb.precision, stp[sa, ia], out_b[:, last])

        for setup, backend in honest.items():
            out = fwd[setup, 0]
            noise = torch.randn(out.shape, generator=gen) * settings.noise
            corrupted: dict[Work, dict[Corruption, torch.Tensor]] = {
                Work.FORWARD: {
                    "noise": out + noise * _rms(out),
                    "skip_block": _forward(backend, hidden, skip),
                    "other_weights": _forward(wrong[setup], hidden, whole),
                    "identity": hidden,
                },
                Work.BACKWARD: {
                    "noise": bwd[setup, 0] + noise * _rms(bwd[setup, 0]),
                    "skip_block": _backward(backend, hidden, grad, skip),
                    "other_weights": _backward(wrong[setup], hidden, grad, whole),
                    "identity": grad,
                },
                Work.INFERENCE: {
                    "noise": stp[setup, 0] + noise[:, last] * _rms(stp[setup, 0]),
                    "skip_block": _steps(backend, hidden, settings.steps, skip),
                    "other_weights": _steps(wrong[setup], hidden, settings.steps, whole),
                    "identity": hidden[:, last],
                },
            }
            for (sb, ib), out_b in fwd.items():
                checks = {Work.FORWARD: out_b, Work.BACKWARD: bwd[sb, ib], Work.INFERENCE: out_b[:, last]}
                for work, outputs in corrupted.items():
                    for kind, bad in outputs.items():
                        m.add_corrupted(work, kind, setup.precision, sb.precision, bad, checks[work])
        progress(
            f"  sample {sample + 1}/{settings.samples}: {settings.batch} rows of {tokens} tokens in "
            f"{len(settings.setups)} setups x {len(settings.splits)} splits, {time.monotonic() - started:.1f} s"
        )


def _tiny_specs(settings: CalibrationSettings) -> list[TinySpec]:
    return [
        TinySpec(arch=arch, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=settings.num_layers, seed=seed)
        for arch in settings.archs
        for hidden in settings.hidden_sizes
        for seed in settings.weight_seeds
    ]


def calibrate(
    settings: CalibrationSettings, *, workdir: Path | None = None, progress: Progress | None = None
) -> ToleranceTable:
    """Run the whole procedure (module docstring) and return a table of one entry, named
    `settings.name` (default "tiny", or the model directory's name); tiny checkpoints go to
    `workdir` (default: a temporary directory); `progress` gets a line per checkpoint and sample."""
    say = progress or (lambda line: None)
    started = time.monotonic()
    gen = torch.Generator().manual_seed(settings.seed)
    m = Disagreements()
    fingerprints: list[str] = []
    if settings.model is not None:
        checkpoint = Checkpoint.open(settings.model)  # ModelLoadError (exit 4) for a bad directory
        say(f"checkpoint 1/1: {settings.model} ({checkpoint.num_blocks} blocks; other weights: its blocks rotated)")
        _measure_checkpoint(checkpoint, None, settings, gen, m, say)
        fingerprints.append(fingerprint_of(checkpoint.model_id))
        hidden_sizes = [checkpoint.hidden_size]
        name = settings.name or checkpoint.path.name
    else:
        specs = _tiny_specs(settings)
        with tempfile.TemporaryDirectory(prefix="corolla-calibration-") as tmp:
            root = workdir or Path(tmp)
            for i, spec in enumerate(specs, 1):
                label = f"{spec.arch}-{spec.hidden_size}-{spec.seed}"
                say(f"checkpoint {i}/{len(specs)}: tiny {label} ({spec.num_layers} blocks)")
                path = init_tiny(root / label, spec)
                other = init_tiny(root / f"{label}-other", _replace_seed(spec, spec.seed + 1000))
                opened = Checkpoint.open(path)
                fingerprints.append(fingerprint_of(opened.model_id))
                _measure_checkpoint(opened, Checkpoint.open(other), settings, gen, m, say)
        hidden_sizes = list(settings.hidden_sizes)
        name = settings.name or "tiny"
    recorded = {k: v for k, v in asdict(settings).items() if k not in ("setups", "margins")}
    recorded["model"] = None if settings.model is None else str(settings.model)
    recorded["setups"] = [s.name for s in settings.setups]
    recorded["corruptions"] = list(CORRUPTIONS)
    recorded.update(
        torch=torch.__version__,
        machine=platform.machine(),
        threads=torch.get_num_threads(),
        seconds=round(time.monotonic() - started, 1),
    )
    entry = m.table(
        settings.margins,
        settings=json.loads(json.dumps(recorded)),
        hidden_sizes=hidden_sizes,
        fingerprints=fingerprints,
    )
    return ToleranceTable(models={name: entry})


def merged(base: ToleranceTable, added: ToleranceTable) -> ToleranceTable:
    """`base` with `added`'s entries put in (an entry of the same name is replaced)."""
    models: dict[str, ModelTolerances] = {**base.models, **added.models}
    return ToleranceTable(models=models, fallback_factor=base.fallback_factor)


def _replace_seed(spec: TinySpec, seed: int) -> TinySpec:
    return TinySpec(**{**asdict(spec), "seed": seed})


def summary(table: ToleranceTable) -> str:
    """Per entry, one line per pair and work: the tolerances (relative L2, scaled largest
    difference), the largest honest disagreement, the smallest relative L2 each corruption
    caused, and the fractions undetected."""
    head = "".join(f"{k[:9]:>10}" for k in CORRUPTIONS)
    lines = []
    for name, entry in table.models.items():
        lines.append(f"{name} (hidden {entry.hidden_sizes}):")
        lines.append(f"{'pair':<18}{'work':<10}{'tol rel':>10}{'tol max':>10}{'honest':>10}{head}  undetected")
        for key, works in entry.tolerances.items():
            for work, e in works.items():
                c = e.corruption_min_rel_l2
                lines.append(
                    f"{key:<18}{work.value:<10}{e.rel_l2:>10.2e}{e.max_abs:>10.2e}{e.honest_max_rel_l2:>10.2e}"
                    + "".join(f"{c.get(k, math.nan):>10.2e}" for k in CORRUPTIONS)
                    + f"  {e.corruption_undetected}"
                )
    return "\n".join(lines)
