"""The coordinator's progress: JSON lines in `<out_dir>/progress.jsonl`, one line per round.

The round loop writes (`ProgressLog`), the launcher reads as lines arrive (`follow`) and
prints one line per round (`format_event`). Each event is also printed to the ServerApp's
stdout, so it appears in the run's log (`flwr log`) for a coordinator that cannot read the
file (`events_from_log`). The events are the typed models of `outcomes.py` (start,
baseline, round, done), each with "time" (Unix seconds), e.g.

    {"event": "round", "round": 2, "rounds": 5, "seconds": 12.3, "nodes": 3, "aggregated": 2,
     "kept": false, "eval": {"loss": 1.23, "accuracy": 0.41, "chance": 0.17},
     "sites": {"site-0": {"status": "ok", "epsilon": 1.2, ...}, "site-2": {"status": "refused", "reason": ...}}}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pydantic import TypeAdapter, ValidationError

from corolla.federation.outcomes import (
    BaselineEvent,
    DoneEvent,
    EvalEvent,
    ProgressEvent,
    RoundEvent,
    RoundStartEvent,
    SiteOutcome,
    StartEvent,
    Status,
    StepEvent,
)
from corolla.federation.view import ProgressView, format_progress

PROGRESS_FILE = "progress.jsonl"
LOG_PREFIX = "corolla-progress "  # marks an event's JSON line in the run log

_log = logging.getLogger(__name__)


class ProgressLog:
    """Appends events to `path`, flushing each line; starts the file afresh (or, with
    `append`, adds to it: a site's file over the rounds of a run)."""

    def __init__(
        self,
        path: Path,
        *,
        echo: bool = True,
        run_log: bool = True,
        view: ProgressView | None = None,
        append: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo  # also show each event on stdout (bars on a terminal, lines elsewhere)
        self.run_log = run_log  # and its JSON line, for a launcher that reads the run log (a ServerApp)
        # A ServerApp's stdout is a log, never a terminal: plain lines there.
        self.view = view if view is not None else ProgressView(format_event, bars=False if run_log else None)
        self._file: TextIO | None = self.path.open("a" if append else "w", encoding="utf-8")

    @classmethod
    def in_dir(
        cls, out_dir: Path | str, *, echo: bool = True, run_log: bool = True, view: ProgressView | None = None
    ) -> ProgressLog:
        return cls(Path(out_dir) / PROGRESS_FILE, echo=echo, run_log=run_log, view=view)

    def emit(self, event: ProgressEvent) -> ProgressEvent:
        record: ProgressEvent = event.model_copy(update={"time": time.time()})
        line = json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False)
        if self._file is None:
            raise ValueError(f"progress log {self.path} is closed")
        self._file.write(line + "\n")
        self._file.flush()
        if self.echo:
            self.view.show(record)
            if self.run_log:
                print(LOG_PREFIX + line, flush=True)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.view.close()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SiteProgress:
    """A site's step events: appended to `<store>/progress.jsonl` (the launcher of a local
    consortium follows it) and shown on the site's own output (a SuperNode's log: plain lines)."""

    def __init__(self, store: Path, *, site: str, server_round: int, steps: int, clock: Callable[[], float]) -> None:
        self.site = site
        self.server_round = server_round
        self.steps = steps
        self.clock = clock
        self.started = clock()
        self._log = ProgressLog(Path(store) / PROGRESS_FILE, run_log=False, append=True)

    def step(self, done: int) -> None:
        event = StepEvent(
            site=self.site,
            round=self.server_round,
            step=done,
            steps=self.steps,
            seconds=round(self.clock() - self.started, 3),
        )
        self._log.emit(event)

    def close(self) -> None:
        self._log.close()


def follow(paths: Path | Sequence[Path], *, done: Callable[[], bool], poll: float = 0.5) -> Iterator[ProgressEvent]:
    """Events appended to `paths` (one file, or several read in turn: the coordinator's and
    the sites') as they come, until `done()` and nothing is left to read.

    Waits for a file to appear; starts it over if it is truncated (a new run); a line is
    read only once its newline is written; lines that are not progress events are skipped.
    """
    tails = [_Tail(Path(p)) for p in ([paths] if isinstance(paths, Path | str) else paths)]
    while True:
        finished = done()  # checked before reading, so the last lines are never missed
        for tail in tails:
            yield from tail.read()
        if finished:
            return
        time.sleep(poll)


class _Tail:
    """The whole lines appended to one file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def read(self) -> list[ProgressEvent]:
        try:
            with self.path.open("rb") as file:
                file.seek(0, 2)
                if file.tell() < self.offset:  # truncated: a new run began
                    self.offset, self.pending = 0, b""
                file.seek(self.offset)
                chunk = file.read()
                self.offset = file.tell()
        except FileNotFoundError:
            chunk = b""
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return [event for event in map(_parse, lines) if event is not None]


def events_from_log(text: str) -> list[ProgressEvent]:
    """The events a ServerApp printed into a run log."""
    events: list[ProgressEvent] = []
    for line in text.splitlines():
        start = line.find(LOG_PREFIX)
        if start >= 0:
            event = _parse(line[start + len(LOG_PREFIX) :].encode())
            if event is not None:
                events.append(event)
    return events


_EVENT: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)


def parse_event(line: bytes | str) -> ProgressEvent:
    """One progress line as its typed event; `ValueError` (pydantic's `ValidationError`) if it is not one."""
    return _EVENT.validate_json(line)


def _parse(line: bytes) -> ProgressEvent | None:
    if not line.strip():
        return None
    try:
        return parse_event(line)
    except ValidationError as exc:
        _log.warning("skipping a progress line that is not an event (%s): %r", exc.errors()[0]["msg"], line[:80])
        return None


# --- one line per event --------------------------------------------------------------------


def format_event(event: ProgressEvent) -> str | None:
    """The line the launcher prints for `event`."""
    if isinstance(event, StartEvent):
        dp = f"DP-SGD, epsilon {event.dp_epsilon} per site" if event.dp else "DP OFF (no privacy)"
        agg = "secure aggregation" if event.secure_agg else "aggregated in the clear"
        return f"training: {event.rounds} rounds, {dp}, {agg}"
    if isinstance(event, BaselineEvent):
        parts = [f"before training: held-out loss {_num(event.eval.get('loss'), '.3f')}"]
        if "accuracy" in event.eval:
            parts.append(f"acc {_num(event.eval['accuracy'], '.2f')} (chance {_num(event.eval.get('chance'), '.2f')})")
        return "  ".join(parts)
    if isinstance(event, RoundStartEvent):
        return f"round {event.round}/{event.rounds}: training on {event.nodes} sites ..."
    if isinstance(event, EvalEvent | StepEvent):
        return format_progress(event)
    if isinstance(event, RoundEvent):
        return format_round(event)
    if isinstance(event, DoneEvent):
        return f"done: adapter {event.adapter}  summary {event.summary}"
    return None


def format_round(event: RoundEvent) -> str:
    """`round 2/5  held-out loss 1.234  acc 0.41 (chance 0.17)  eps site-0 1.2 site-1 1.2 site-2 -  12.3 s`"""
    parts = [f"round {event.round}/{event.rounds}"]
    scores = event.eval
    if "loss" in scores:
        parts.append(f"held-out loss {_num(scores['loss'], '.3f')}")
    if "accuracy" in scores:
        chance = f" (chance {_num(scores['chance'], '.2f')})" if "chance" in scores else ""
        parts.append(f"acc {_num(scores['accuracy'], '.2f')}{chance}")
    sites: dict[str, SiteOutcome] = event.sites
    if event.dp:
        eps = " ".join(f"{name} {_num(info.epsilon, '.3g')}" for name, info in sorted(sites.items()))
        parts.append(f"eps {eps}" if eps else "eps -")
    else:
        parts.append("eps: DP OFF")
    parts.append(f"{_num(event.seconds, '.1f')} s")
    # Why a site refused or failed is its own message; offline (no heartbeat) and missing
    # (no reply in time) say it all.
    for status in (Status.REFUSED, Status.FAILED, Status.OFFLINE, Status.MISSING):
        names = [
            f"{name} ({_short(info.reason)})" if info.reason and status in (Status.REFUSED, Status.FAILED) else name
            for name, info in sorted(sites.items())
            if info.status == status
        ]
        if names:
            parts.append(f"{status.value}: {', '.join(names)}")
    if event.verify is not None:
        parts.append(f"audits {event.verify.audits:d}")
        if event.verify.quarantined:
            parts.append(f"QUARANTINED: {', '.join(str(n)[:16] for n in event.verify.quarantined)}")
    secure = event.secure_agg
    if secure is not None and secure.error:
        parts.append(f"secure aggregation failed ({_short(secure.error)})")
    elif secure is not None and secure.dropped:
        parts.append(f"secure aggregation: {secure.dropped} dropped, their masks removed")
    if event.kept:
        parts.append("no updates: weights unchanged")
    return "  ".join(parts)


def _num(value: float | int | None, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, spec)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
