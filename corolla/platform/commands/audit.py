"""`platform audit`: the verification ledger's report, its chain check, and re-admission.

    platform audit report  [--ledger URL] [--format html|json|md] [--out FILE] [--public-key FILE] [--witness FILE]
    platform audit verify  [--ledger URL] [--public-key FILE] [--witness FILE]
    platform audit readmit NODE_ID --model-id ID --blocks START:END --reason TEXT [--ledger URL]
    platform audit calibrate --out FILE [--model DIR] [--samples N] [--seed N] [--threads T]

The ledger defaults to the workspace's SQLite file and the public key to the public part of
the workspace's ledger key (`corolla.verify.ledger_paths`). `report` and `verify` open the
ledger read-only (`Ledger.open_readonly`): checking a ledger never changes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from corolla.platform.commands import calibrate
from corolla.platform.commands._flags import add_renamed
from corolla.platform.commands.serve import parse_span
from corolla.platform.workspace import resolve_workspace
from corolla.verify.errors import LedgerError, LedgerTamperedError, VerifyError
from corolla.verify.events import ReadmitEvent, Subject
from corolla.verify.ledger import ChainCheck, Ledger, LedgerKey, LedgerPublicKey, Witness
from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_url
from corolla.verify.reputation import ReputationBook, ReputationPolicy

__all__ = ["open_existing_ledger", "register", "reputation_book"]

Format = Literal["html", "json", "md"]
_SUFFIXES: dict[str, Format] = {".html": "html", ".htm": "html", ".json": "json", ".md": "md", ".markdown": "md"}
_PROGRESS_OVER = 20_000  # ledgers with more events than this report progress on stderr


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    audit = sub.add_parser(
        "audit", help="the verification ledger: reports, chain check, re-admission; tolerance calibration"
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)

    report = audit_sub.add_parser("report", help="write an audit report (HTML with plots, JSON or Markdown)")
    report.add_argument("--format", choices=["html", "json", "md"], help="default: from --out's suffix, else html")
    report.add_argument(
        "--out",
        metavar="FILE",
        help="file to write, - for stdout (default <workspace>/reports/audit-<UTC time>.<format>)",
    )
    report.set_defaults(run=run_report)

    verify = audit_sub.add_parser("verify", help="check the ledger's hash chain and signed head")
    verify.set_defaults(run=run_verify)

    readmit = audit_sub.add_parser("readmit", help="let a quarantined node back (it starts on probation)")
    readmit.add_argument("node_id", metavar="NODE_ID", help="the node id as it appears in the ledger")
    # Required, checked in run_readmit: argparse would not count the old spelling as giving it.
    add_renamed(readmit, "--model-id", "--model", metavar="ID", help="model id as announced (required)")
    readmit.add_argument("--blocks", required=True, type=parse_span, metavar="START:END", help="the quarantined span")
    readmit.add_argument("--reason", required=True, help="why it may come back (recorded in the ledger)")
    readmit.add_argument("--reporter", default="operator", help="who decides, recorded in the event")
    readmit.add_argument("--key", help="the ledger's private key (default <workspace>/ledger/ledger.key)")
    readmit.add_argument("--force", action="store_true", help="write it even if the subject is not quarantined")
    readmit.set_defaults(run=run_readmit)

    calibrate.register(audit_sub)

    for p in (report, verify, readmit):
        p.add_argument("--workspace", help="state directory (default ~/.corolla or $COROLLA_WORKSPACE)")
        p.add_argument(
            "--ledger", metavar="URL", help="SQLite path or URL, or postgresql:// (default: the workspace's)"
        )
    for p in (report, verify):
        p.add_argument(
            "--public-key",
            metavar="FILE",
            help="ledger public key: PEM, certificate or 64 hex characters (default: the workspace ledger key's)",
        )
        p.add_argument(
            "--witness",
            metavar="FILE",
            help="a signed head seen earlier (a site's ledger-witness.json): fail if the ledger is older or forked",
        )


# -- shared ----------------------------------------------------------------------------------


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ledger URL or path; None for a server database."""
    if "://" not in url:
        return Path(url).expanduser()
    scheme, _, rest = url.partition(":///")
    if scheme in ("sqlite", "sqlite+pysqlite") and rest and rest != ":memory:":
        return Path(rest).expanduser()
    return None


def open_existing_ledger(url: str, *, key: LedgerKey | None = None, writer: str = "") -> Ledger:
    """Open a ledger that must already exist: reading a mistyped path must not create an empty one."""
    path = _sqlite_file(url)
    if path is not None and not path.is_file():
        raise LedgerError(f"no ledger at {path} (nothing has been audited there yet; give --ledger URL)")
    return Ledger.open(url, key=key, writer=writer)


def _ledger_url(args: argparse.Namespace) -> tuple[str, Path]:
    workspace = resolve_workspace(args.workspace)
    return (args.ledger or default_ledger_url(workspace)), workspace


def _public_key(args: argparse.Namespace, workspace: Path) -> LedgerPublicKey | None:
    if args.public_key:
        return LedgerPublicKey.load(Path(args.public_key))
    key_path = default_ledger_key_path(workspace)
    if not key_path.is_file():
        return None
    try:
        return LedgerKey.from_private_pem(key_path.read_bytes()).public_key()
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger key {key_path}: {exc.strerror}") from None


def _no_key_message(workspace: Path) -> str:
    return (
        f"no public key to check the signed head: give --public-key FILE, or run where "
        f"{default_ledger_key_path(workspace)} exists"
    )


def _witness(args: argparse.Namespace) -> Witness | None:
    return Witness.load(Path(args.witness)) if args.witness else None


def _named(ledger: Ledger, exc: LedgerTamperedError) -> LedgerTamperedError:
    """The same error (same type, same seq), its one line naming the ledger."""
    return type(exc)(f"{ledger.where}: {exc}", seq=exc.seq)


def reputation_book(ledger: Ledger, policy: ReputationPolicy | None = None) -> ReputationBook:
    """The ledger replayed through the reputation policy (what routing acts on)."""
    return ReputationBook.replay((stored.event for stored in ledger.events()), policy)


# -- report ----------------------------------------------------------------------------------


def _report_format(args: argparse.Namespace) -> Format:
    if args.format:
        fmt: Format = args.format
        return fmt
    if args.out and args.out != "-":
        return _SUFFIXES.get(Path(args.out).suffix.lower(), "html")
    return "html"


def _write(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run_report(args: argparse.Namespace) -> int:
    from corolla.verify.report import chain_status, ledger_report, render_html, render_json, render_markdown

    url, workspace = _ledger_url(args)
    fmt = _report_format(args)
    public_key = _public_key(args, workspace)
    witness = _witness(args)
    if witness is not None:
        if public_key is None:
            raise LedgerError(f"--witness needs the ledger's public key to check it; {_no_key_message(workspace)}")
        witness.check(public_key)
    with Ledger.open_readonly(url) as ledger:
        total = ledger.count()
        loud = total > _PROGRESS_OVER
        if public_key is None:
            print(f"platform audit report: {_no_key_message(workspace)}; the report says so", file=sys.stderr)
        elif loud:
            print(f"checking the chain of {total} events as they are read ...", file=sys.stderr, flush=True)

        def progress(n: int) -> None:
            print(f"read {n}/{total} events", file=sys.stderr, flush=True)

        # One pass: each row is read and parsed once while the chain is checked (Ledger.scan).
        report = ledger_report(
            ledger, public_key, progress=progress if loud else None, progress_every=max(10_000, total // 10)
        )
        if witness is not None and report.chain.state == "verified" and report.chain.head_seq is not None:
            check = ChainCheck(
                events=report.chain.events or 0, head_seq=report.chain.head_seq, head_hash=report.chain.head_hash or ""
            )
            try:
                ledger.check_witness(check, witness)
            except LedgerTamperedError as exc:  # rolled back or forked: the report says so, as verify does
                report = report.model_copy(update={"chain": chain_status(exc)})
    text = {"html": render_html, "json": render_json, "md": render_markdown}[fmt](report)
    t = report.totals
    if args.out == "-":
        sys.stdout.write(text)
        where = "stdout"
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report.generated_at))
        out = Path(args.out) if args.out else workspace / "reports" / f"audit-{stamp}.{fmt}"
        _write(out, text)
        where = str(out)
    summary = (
        f"wrote the {fmt} audit report to {where}: {t.events} events, {t.subjects} subjects, "
        f"{t.quarantined_now} quarantined; chain {report.chain.state}"
    )
    print(summary, file=sys.stderr if args.out == "-" else sys.stdout)
    if report.chain.state == "tampered":
        print(f"platform audit report: {report.chain.message}", file=sys.stderr)
        return LedgerTamperedError.exit_code
    return 0


# -- verify ----------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    url, workspace = _ledger_url(args)
    public_key = _public_key(args, workspace)
    if public_key is None:
        raise LedgerError(_no_key_message(workspace))
    witness = _witness(args)
    with Ledger.open_readonly(url) as ledger:  # writes nothing; an emptied file is LedgerTamperedError
        try:
            # LedgerTamperedError (exit 14): the first bad event, the head, or a rollback past the witness
            check = ledger.verify(public_key, witness=witness)
        except LedgerTamperedError as exc:
            raise _named(ledger, exc) from None
    against = f"; holds the witness's head {witness.seq}" if witness is not None else ""
    print(f"ok: {check.events} events, head {check.head_seq} {check.head_hash}{against}")
    return 0


# -- readmit ---------------------------------------------------------------------------------


class UsageError(VerifyError):
    """A required flag is missing (argparse cannot see a renamed flag's old spelling as it)."""

    exit_code = 2


def run_readmit(args: argparse.Namespace) -> int:
    if not args.model_id:
        raise UsageError("--model-id ID is required: the model id the quarantine names")
    url, workspace = _ledger_url(args)
    key_path = Path(args.key) if args.key else default_ledger_key_path(workspace)
    try:
        key = LedgerKey.from_private_pem(key_path.read_bytes())
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger key {key_path}: {exc.strerror} (give --key FILE)") from None
    start, end = args.blocks
    subject = Subject(node_id=args.node_id, model_id=args.model_id, start=start, end=end)
    with open_existing_ledger(url, key=key, writer=args.reporter) as ledger:
        book = reputation_book(ledger)
        if not book.is_quarantined(subject) and not args.force:
            held = sorted(f"{s.model_id} {s.start}:{s.end}" for s in book.quarantined() if s.node_id == subject.node_id)
            where = f"it is quarantined for: {', '.join(held)}" if held else "it is not quarantined anywhere"
            raise VerifyError(
                f"{subject.node_id} is not quarantined for {subject.model_id} blocks {start}:{end}; {where} "
                "(--force writes the re-admission anyway)"
            )
        event = ReadmitEvent(
            event_id=uuid.uuid4().hex, at=time.time(), reporter=args.reporter, subject=subject, reason=args.reason
        )
        (seq,) = ledger.append([event])
    print(
        f"re-admitted {subject.node_id} for {subject.model_id} blocks {start}:{end} at seq {seq}; "
        f"on probation for its next {book.policy.probation_audits} audits"
    )
    return 0
