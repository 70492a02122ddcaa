"""`platform audit calibrate`: measure a tolerance table (the harness is `corolla.platform.calibration`).

    platform audit calibrate --out FILE [--model DIR] [--entry NAME] [--add-to TABLE] [--samples N]
        [--batch N] [--max-tokens N] [--precisions P,...] [--seed N] [--threads T]

Without `--model` it calibrates on tiny random Llama and GPT-2 checkpoints (entry "tiny"), as
the shipped `corolla/verify/data/tolerances.json` was made; with it, on that checkpoint (entry
NAME, default the directory's name). `--add-to TABLE` writes TABLE's entries plus the new one
(`--add-to shipped` starts from the shipped table), so one table serves several models. Progress goes to
stderr; the summary and the file written to stdout. Errors: a bad flag exits 2 (usage), a
model directory that cannot be loaded 4, settings or an output the calibration cannot use 13.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["register", "run_calibrate"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def register(audit_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    """Add `calibrate` to `platform audit`'s subcommands."""
    calibrate = audit_sub.add_parser(
        "calibrate",
        help="measure how much honest servers of different precisions disagree: a tolerance table",
        description="Run a span in every honest setup (float32, bfloat16, float16, int8, nf4; several batch "
        "splits) and with corruptions, and write the tolerance table for --tolerances FILE.",
    )
    calibrate.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="where to write the tolerance table (JSON)"
    )
    calibrate.add_argument(
        "--model", type=Path, metavar="DIR", help="calibrate this checkpoint (default: tiny random ones)"
    )
    calibrate.add_argument(
        "--samples", type=_positive_int, default=2, metavar="N", help="input batches per model (default 2)"
    )
    calibrate.add_argument(
        "--seed", type=int, default=0, metavar="N", help="token ids, noise and skipped blocks (default 0)"
    )
    calibrate.add_argument("--entry", default="", metavar="NAME", help="the table entry's name (e.g. the model's)")
    calibrate.add_argument(
        "--add-to",
        metavar="TABLE",
        help="write TABLE's entries plus this one ('shipped': the shipped table's); default: this entry alone",
    )
    calibrate.add_argument(
        "--batch", type=_positive_int, default=8, metavar="N", help="rows per input batch (default 8)"
    )
    calibrate.add_argument(
        "--max-tokens", type=_positive_int, default=32, metavar="N", help="longest row in tokens (default 32)"
    )
    calibrate.add_argument(
        "--precisions",
        default="",
        metavar="P,...",
        help="only the setups of these precisions (float32 always; default: all of float32, bfloat16, float16, "
        "int8, nf4)",
    )
    calibrate.add_argument("--threads", type=_positive_int, default=1, metavar="T", help="torch threads (default 1)")
    calibrate.set_defaults(run=run_calibrate)


def _check_out(out: Path) -> None:
    """Fail before minutes of measuring, not after: the directory must be there or creatable."""
    from corolla.platform.calibration import CalibrationError

    if out.is_dir():
        raise CalibrationError(f"--out {out} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"cannot create the directory of --out {out}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise CalibrationError(f"cannot write --out {out}: {out.parent} is not writable")


def _write(out: Path, text: str) -> None:
    """Atomically: a reader (a coordinator given --tolerances) never sees half a table."""
    from corolla.platform.calibration import CalibrationError

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        raise CalibrationError(f"cannot write the tolerance table {out}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def run_calibrate(args: argparse.Namespace) -> int:
    import torch  # the harness and torch load only for this subcommand
    from transformers.utils import logging as hf_logging

    from corolla.inference.models.checkpoint import Checkpoint
    from corolla.platform.calibration import SETUPS, CalibrationError, CalibrationSettings, calibrate, merged, summary
    from corolla.verify.tolerance import load_table

    wanted = {"float32", *(p.strip() for p in args.precisions.split(",") if p.strip())}
    unknown = wanted - {s.precision for s in SETUPS}
    if unknown:
        raise CalibrationError(f"--precisions {args.precisions!r}: unknown {', '.join(sorted(unknown))}")
    setups = tuple(s for s in SETUPS if not args.precisions or s.precision in wanted)
    b = args.batch
    splits = ((b,), (1,) * b, (b - b // 2, b // 2)) if b > 1 else ((1,),)
    settings = CalibrationSettings(
        samples=args.samples,
        seed=args.seed,
        model=args.model,
        name=args.entry,
        batch=b,
        splits=splits,
        max_tokens=args.max_tokens,
        setups=setups,
    )
    base = None
    if args.add_to:  # read before minutes of measuring: a bad table fails at once (exit 13)
        base = load_table(None if args.add_to == "shipped" else args.add_to)
    if args.model is not None:
        Checkpoint.open(args.model)  # ModelLoadError (exit 4) before anything is printed or created
    _check_out(args.out)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # init_tiny's "Writing model shards" bars

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    what = str(args.model) if args.model else "tiny random checkpoints"
    progress(f"calibrating on {what}: {args.samples} sample(s) per checkpoint, {args.threads} thread(s)")
    started = time.monotonic()
    table = calibrate(settings, progress=progress)
    if base is not None:
        table = merged(base, table)
    _write(args.out, json.dumps(table.model_dump(mode="json"), indent=1, sort_keys=True) + "\n")
    print(summary(table))
    print(
        f"wrote the tolerance table to {args.out}: {len(table.models)} model entr"
        f"{'y' if len(table.models) == 1 else 'ies'}, "
        f"{sum(len(m.tolerances) for m in table.models.values())} precision pairs, "
        f"{time.monotonic() - started:.1f} s"
    )
    return 0
