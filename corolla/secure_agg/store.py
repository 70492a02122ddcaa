"""Where a site keeps its round state between its two messages: its own private store.

Flower starts a fresh ClientApp process per message, so the state `site_upload` returns
must be on disk when the unmask request comes. One file per (run, round), mode 0600, in a
0700 directory per run (named by a hash of the run id, so that no run id can walk out of
the store). `take` deletes the state as it reads it: a site answers one unmask request
per round, however often it is asked. `save` refuses a round at or below the last one the
site uploaded for in that run: a replayed or repeated announcement gets no second upload
(two uploads with different self-masks over the same input would help unmask it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from corolla.secure_agg.errors import MalformedMessage, RefusedRequest, RoundStateError
from corolla.secure_agg.messages import RoundState, parse


class RoundStateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, state: bytes) -> Path:
        """Keep a round state from `site_upload`; call it before sending the upload."""
        try:
            parsed = parse(RoundState, state)
        except MalformedMessage as exc:
            raise RoundStateError(f"not a round state: {exc}") from None
        run_dir = self._run_dir(parsed.run_id)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        last = self._last_round(run_dir)
        if last is not None and parsed.round <= last:
            raise RefusedRequest(
                f"this site already uploaded for round {last} of run {parsed.run_id}; it will not upload for round "
                f"{parsed.round} (a replayed or repeated announcement)"
            )
        _write_atomic(run_dir / "last-round", str(parsed.round).encode())
        path = run_dir / f"round-{parsed.round}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(state)
        return path

    def take(self, run_id: str, round: int) -> bytes:
        """The state of (run, round), deleted as it is read; `RoundStateError` if there is none."""
        path = self._run_dir(run_id) / f"round-{round}.json"
        taken = path.with_suffix(".taken")
        try:
            os.rename(path, taken)  # atomic: of two concurrent takers, one gets the state
        except FileNotFoundError:
            raise RoundStateError(
                f"no state for run {run_id} round {round}: this site did not upload in that round, or it has "
                f"already answered that round's unmask request"
            ) from None
        try:
            return taken.read_bytes()
        finally:
            taken.unlink()

    def last_round(self, run_id: str) -> int | None:
        """The last round this site uploaded for in `run_id` (None: none yet). Read-only: a
        site checks it before training, so a replayed announcement costs no privacy budget."""
        return self._last_round(self._run_dir(run_id))

    def _run_dir(self, run_id: str) -> Path:
        return self.directory / ("run-" + hashlib.sha256(run_id.encode()).hexdigest()[:32])

    @staticmethod
    def _last_round(run_dir: Path) -> int | None:
        path = run_dir / "last-round"
        if not path.is_file():
            return None
        try:
            return int(path.read_text().strip())
        except ValueError:
            raise RoundStateError(f"{str(path)!r} is corrupt; remove the run's directory to start over") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
