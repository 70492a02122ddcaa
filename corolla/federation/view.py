"""Watching a run: progress events shown as bars on a terminal, as plain lines elsewhere.

On a terminal (`isatty`), tqdm bars: the rounds, the held-out evaluation under way, and each
site's steps in the current round; the one-line summaries (start, baseline, each round, done)
are printed above the bars. Anywhere else (CI logs, a file, a ServerApp's run log) the same
events are plain lines, at most one per site and per evaluation every `every` seconds, plus
each one's last (`step 5/5`, `200/200 notes`), so a log stays readable:

    evaluating before training: 64/200 notes  21.3 s
    site-0 round 1: step 3/5  61.0 s
    round 1/3  held-out loss 1.234  acc 0.41 (chance 0.12)  eps site-0 1.2 ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from corolla.federation.outcomes import (
    EvalEvent,
    ProgressEvent,
    RoundEvent,
    RoundStartEvent,
    StartEvent,
    StepEvent,
)

__all__ = ["ProgressView", "format_progress"]

Echo = Callable[[str], None]
PLAIN_EVERY = 10.0  # seconds between two plain lines of one evaluation or one site's steps


def format_progress(event: EvalEvent | StepEvent) -> str:
    """The plain line of an evaluation or step event."""
    if isinstance(event, EvalEvent):
        what = "before training" if event.round == 0 else f"round {event.round}/{event.rounds}"
        return f"evaluating {what}: {event.done}/{event.total} notes  {event.seconds:.1f} s"
    return f"{event.site} round {event.round}: step {event.step}/{event.steps}  {event.seconds:.1f} s"


class ProgressView:
    """Shows progress events as they come: bars on a terminal, throttled lines otherwise.

    `lines(event)` gives the summary line of an event (None: it has none); `echo` prints it.
    `bars` None = bars when `stream` (where the bars go, stderr by default) is a terminal."""

    def __init__(
        self,
        lines: Callable[[ProgressEvent], str | None],
        *,
        echo: Echo = print,
        bars: bool | None = None,
        stream: TextIO | None = None,
        every: float = PLAIN_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines = lines
        self.echo = echo
        self.stream = stream if stream is not None else sys.stderr
        self.bars = _isatty(self.stream) if bars is None else bars
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}  # plain mode: when each evaluation / site last printed
        self._rounds: Any = None  # tqdm bars (typed Any: tqdm's stubs are not installed)
        self._eval: Any = None
        self._steps: dict[str, Any] = {}

    def show(self, event: ProgressEvent) -> None:
        if isinstance(event, EvalEvent | StepEvent):
            if self.bars:
                self._bar(event)
            elif self._due(event):
                self.echo(format_progress(event))
            return
        line = self.lines(event)
        if self.bars:
            self._overall(event)
            if line:
                self._write(line)
        elif line:
            self.echo(line)

    def close(self) -> None:
        for bar in [self._eval, *self._steps.values(), self._rounds]:
            if bar is not None:
                bar.close()
        self._eval, self._steps, self._rounds = None, {}, None

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain lines -----------------------------------------------------------------------------

    def _due(self, event: EvalEvent | StepEvent) -> bool:
        key = f"eval {event.round}" if isinstance(event, EvalEvent) else f"step {event.site} {event.round}"
        last = event.done >= event.total if isinstance(event, EvalEvent) else event.step >= event.steps
        now = self.clock()
        if last or key not in self._last or now - self._last[key] >= self.every:
            self._last[key] = now
            return True
        return False

    # -- bars ------------------------------------------------------------------------------------

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)  # above the bars, which are cleared and redrawn

    def _new_bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        # events come seconds apart: draw each one (tqdm would skip updates within 0.1 s)
        return tqdm(file=self.stream, dynamic_ncols=True, mininterval=0, miniters=1, **kwargs)

    def _overall(self, event: ProgressEvent) -> None:
        if isinstance(event, StartEvent) and self._rounds is None:
            self._rounds = self._new_bar(total=event.rounds, desc="rounds", unit="round", position=0)
        elif isinstance(event, RoundStartEvent):
            for bar in self._steps.values():
                bar.close()
            self._steps = {}
            if self._rounds is not None:
                self._rounds.set_postfix_str(f"round {event.round}: {event.nodes} sites training")
        elif isinstance(event, RoundEvent) and self._rounds is not None:
            self._rounds.update(event.round - self._rounds.n)
            self._rounds.set_postfix_str("")

    def _bar(self, event: EvalEvent | StepEvent) -> None:
        if isinstance(event, EvalEvent):
            what = "baseline eval" if event.round == 0 else f"eval round {event.round}"
            if self._eval is None or self._eval.desc != what:
                if self._eval is not None:
                    self._eval.close()
                self._eval = self._new_bar(total=event.total, desc=what, unit="note", leave=False)
            self._eval.update(event.done - self._eval.n)
            if event.done >= event.total:
                self._eval.close()
                self._eval = None
            return
        bar = self._steps.get(event.site)
        what = f"{event.site} round {event.round}"
        if bar is None or bar.desc != what:
            if bar is not None:
                bar.close()
            bar = self._steps[event.site] = self._new_bar(total=event.steps, desc=what, unit="step", leave=False)
        bar.update(event.step - bar.n)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
