"""The documentation site builds with `mkdocs build --strict`: a broken link, a page missing
from the nav or a failing CLI-reference hook fails the default tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    # the reference is generated from the parser: every subcommand appears with its own flags
    for needle in ("platform serve", "--blocks", "platform train", "--dp-epsilon", "platform model import"):
        assert needle in reference, needle
