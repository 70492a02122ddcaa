"""Eight writer processes appending at once: nothing lost, nothing twice, seq without gaps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from corolla.verify.ledger import Ledger, LedgerKey

from ._writer import OWN, SHARED

REPO = Path(__file__).resolve().parents[3]
WRITERS = 8


def test_concurrent_writer_processes(ledger_url: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    key_path = tmp_path / "keys" / "ledger.key"
    names = [f"w{i}" for i in range(WRITERS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.verify.ledger._writer", ledger_url, str(key_path), name, str(ready)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(ready.iterdir())) < WRITERS and time.monotonic() < deadline:
            time.sleep(0.05)
        (ready / "go").touch()  # all imported: start appending together
        started = time.monotonic()
        results = [p.communicate(timeout=120) for p in procs]
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p, (_out, err) in zip(names, procs, results, strict=True):
        assert p.returncode == 0, f"writer {name} failed:\n{err}"
    replies = [json.loads(out) for out, _ in results]

    key = LedgerKey.load_or_create(key_path)
    with Ledger.open(ledger_url) as ledger:
        stored = list(ledger.events(batch=97))
        check = ledger.verify(key.public_key())
    shared_sent = {eid for reply in replies for eid in reply if eid.startswith("readmit-shared")}
    total = WRITERS * OWN + len(shared_sent)
    assert [s.seq for s in stored] == list(range(1, total + 1))  # no gaps, nothing twice
    by_id = {s.event.event_id: s for s in stored}
    assert len(by_id) == total
    assert check.events == check.head_seq == total
    assert shared_sent <= {ev.event_id for ev in SHARED}
    for name, reply in zip(names, replies, strict=True):
        own = {eid for eid in reply if eid not in shared_sent}
        assert len(own) == OWN
        for eid, seq in reply.items():
            assert by_id[eid].seq == seq  # every writer was told the seq its event really has
        assert all(by_id[eid].writer == name for eid in own)
    print(f"{WRITERS} writers appended {total} events in {elapsed:.1f} s")
    assert elapsed < 60, f"{WRITERS} writers took {elapsed:.1f} s"
