"""The coordinator's progress: JSON lines in `<out_dir>/progress.jsonl`, one line per round.

The ServerApp writes (`ProgressLog`), the launcher reads as lines arrive (`follow`) and
prints one line per round (`format_event`). Each event is also printed to the ServerApp's
stdout, so it appears in the run's log (`flwr log`) for a coordinator that cannot read the
file (`events_from_log`). Events:

    {"event": "start", "rounds": 5, "dp": true, "dp_epsilon": 3.0, "secure_agg": true, "sites_expected": 3}
    {"event": "round", "round": 2, "rounds": 5, "seconds": 12.3, "nodes": 3, "aggregated": 2,
     "kept": false, "eval": {"loss": 1.23, "accuracy": 0.41, "chance": 0.17},
     "sites": {"site-0": {"status": "ok", "epsilon": 1.2, ...}, "site-2": {"status": "refused", "reason": ...}}}
    {"event": "done", "adapter": "...", "summary": "..."}

Every event also has "time" (Unix seconds).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

PROGRESS_FILE = "progress.jsonl"
LOG_PREFIX = "corolla-progress "  # marks an event's JSON line in the run log

_log = logging.getLogger(__name__)


class ProgressLog:
    """Appends events to `path`, flushing each line; starts the file afresh."""

    def __init__(self, path: Path, *, echo: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo  # also print each event (and its human line) to stdout
        self._file: TextIO | None = self.path.open("w", encoding="utf-8")

    @classmethod
    def in_dir(cls, out_dir: Path | str, *, echo: bool = True) -> ProgressLog:
        return cls(Path(out_dir) / PROGRESS_FILE, echo=echo)

    def emit(self, event: Mapping[str, Any]) -> dict[str, Any]:
        record = {**event, "time": time.time()}
        line = json.dumps(record, ensure_ascii=False, allow_nan=False)
        if self._file is None:
            raise ValueError(f"progress log {self.path} is closed")
        self._file.write(line + "\n")
        self._file.flush()
        if self.echo:
            human = format_event(record)
            if human:
                print(human, flush=True)
            print(LOG_PREFIX + line, flush=True)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow(path: Path, *, done: Callable[[], bool], poll: float = 0.5) -> Iterator[dict[str, Any]]:
    """Events appended to `path` as they come, until `done()` and nothing is left to read.

    Waits for the file to appear; starts over if it is truncated (a new run); a line is
    read only once its newline is written; lines that are not JSON objects are skipped.
    """
    offset, pending = 0, b""
    while True:
        finished = done()  # checked before reading, so the last lines are never missed
        try:
            with Path(path).open("rb") as file:
                file.seek(0, 2)
                if file.tell() < offset:  # truncated: a new run began
                    offset, pending = 0, b""
                file.seek(offset)
                chunk = file.read()
                offset = file.tell()
        except FileNotFoundError:
            chunk = b""
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            event = _parse(line)
            if event is not None:
                yield event
        if finished:
            return
        time.sleep(poll)


def events_from_log(text: str) -> list[dict[str, Any]]:
    """The events a ServerApp printed into a run log."""
    events = []
    for line in text.splitlines():
        start = line.find(LOG_PREFIX)
        if start >= 0:
            event = _parse(line[start + len(LOG_PREFIX) :].encode())
            if event is not None:
                events.append(event)
    return events


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError:
        _log.warning("skipping a progress line that is not JSON: %r", line[:80])
        return None
    return event if isinstance(event, dict) and "event" in event else None


# --- one line per event --------------------------------------------------------------------


def format_event(event: Mapping[str, Any]) -> str | None:
    """The line the launcher prints for `event` (None for events it does not show)."""
    kind = event.get("event")
    if kind == "start":
        dp = f"DP-SGD, epsilon {event.get('dp_epsilon')} per site" if event.get("dp") else "DP OFF (no privacy)"
        agg = "secure aggregation" if event.get("secure_agg") else "aggregated in the clear"
        return f"training: {event.get('rounds')} rounds, {dp}, {agg}"
    if kind == "baseline":
        evaluation = event.get("eval") or {}
        parts = [f"before training: held-out loss {_num(evaluation.get('loss'), '.3f')}"]
        if "accuracy" in evaluation:
            parts.append(f"acc {_num(evaluation['accuracy'], '.2f')} (chance {_num(evaluation.get('chance'), '.2f')})")
        return "  ".join(parts)
    if kind == "round":
        return format_round(event)
    if kind == "done":
        return f"done: adapter {event.get('adapter')}  summary {event.get('summary')}"
    return None


def format_round(event: Mapping[str, Any]) -> str:
    """`round 2/5  held-out loss 1.234  acc 0.41 (chance 0.17)  eps site-0 1.2 site-1 1.2 site-2 -  12.3 s`"""
    parts = [f"round {event.get('round')}/{event.get('rounds')}"]
    evaluation = event.get("eval") or {}
    if "loss" in evaluation:
        parts.append(f"held-out loss {_num(evaluation['loss'], '.3f')}")
    if "accuracy" in evaluation:
        chance = f" (chance {_num(evaluation['chance'], '.2f')})" if "chance" in evaluation else ""
        parts.append(f"acc {_num(evaluation['accuracy'], '.2f')}{chance}")
    sites: Mapping[str, Mapping[str, Any]] = event.get("sites") or {}
    if event.get("dp", True):
        eps = " ".join(f"{name} {_num(info.get('epsilon'), '.3g')}" for name, info in sorted(sites.items()))
        parts.append(f"eps {eps}" if eps else "eps -")
    else:
        parts.append("eps: DP OFF")
    parts.append(f"{_num(event.get('seconds'), '.1f')} s")
    # Why a site refused or failed is its own message; offline (no heartbeat) and missing
    # (no reply in time) say it all.
    for status in ("refused", "failed", "offline", "missing"):
        names = [
            f"{name} ({_short(info['reason'])})" if info.get("reason") and status in ("refused", "failed") else name
            for name, info in sorted(sites.items())
            if info.get("status") == status
        ]
        if names:
            parts.append(f"{status}: {', '.join(names)}")
    verify = event.get("verify")
    if isinstance(verify, Mapping):
        parts.append(f"audits {_num(verify.get('audits'), 'd')}")
        quarantined = verify.get("quarantined") or []
        if quarantined:
            parts.append(f"QUARANTINED: {', '.join(str(n)[:16] for n in quarantined)}")
    secure = event.get("secure_agg")
    if isinstance(secure, Mapping) and secure.get("error"):
        parts.append(f"secure aggregation failed ({_short(secure['error'])})")
    elif isinstance(secure, Mapping) and secure.get("dropped"):
        parts.append(f"secure aggregation: {secure['dropped']} dropped, their masks removed")
    if event.get("kept"):
        parts.append("no updates: weights unchanged")
    return "  ".join(parts)


def _num(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, spec)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
