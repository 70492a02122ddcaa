"""One writer process of the concurrency test (run as `python -m tests.verify.ledger._writer`).

Arguments: URL KEY_PATH NAME READY_DIR. It imports everything, says it is ready, waits for
the go signal (READY_DIR/go), then opens the ledger (possibly migrating a fresh database
while the others do the same) and appends its own 60 events in small batches, resending
some of its earlier events and some events every writer shares. Prints {event_id: seq}.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey

from .factories import mixed, readmit

OWN = 60
SHARED = [readmit(f"shared{j:02d}", node="node-s") for j in range(10)]  # identical in every writer


def main(url: str, key_path: str, name: str, ready_dir: str) -> int:
    ready = Path(ready_dir)
    (ready / name).touch()
    deadline = time.monotonic() + 60
    while not (ready / "go").exists():
        if time.monotonic() > deadline:
            print("no go signal", file=sys.stderr)
            return 3
        time.sleep(0.005)
    key = LedgerKey.load_or_create(Path(key_path))  # the writers race to create it, too
    rng = random.Random(name)
    own = mixed(OWN, prefix=f"{name}-")
    seqs: dict[str, int] = {}
    with Ledger.open(url, key=key, writer=name) as ledger:
        i = 0
        while i < OWN:
            n = rng.randint(1, 5)
            batch: list[AnyEvent] = own[i : i + n]
            if i and rng.random() < 0.4:
                batch += rng.sample(own[:i], min(i, 2))  # resend: an acknowledgement was lost
            if rng.random() < 0.3:
                batch.append(rng.choice(SHARED))
            i += n
            for ev, seq in zip(batch, ledger.append(batch), strict=True):
                if seqs.setdefault(ev.event_id, seq) != seq:
                    print(f"{ev.event_id} came back as seq {seq}, before as {seqs[ev.event_id]}", file=sys.stderr)
                    return 4
    print(json.dumps(seqs))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
