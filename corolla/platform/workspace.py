"""Where a node keeps its state: `--workspace`, else `$COROLLA_WORKSPACE`, else `~/.corolla`.

The embedded default model (a tiny Llama) is made here on first use, so that
`platform generate` with no arguments needs nothing but the package.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from corolla.inference.models.tiny import Arch, TinySpec, init_tiny


def resolve_workspace(explicit: str | Path | None = None) -> Path:
    root = Path(explicit or os.environ.get("COROLLA_WORKSPACE") or Path.home() / ".corolla").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True, slots=True)
class LocalConsortium:
    """A throwaway CA and its nodes, for the embedded defaults and tests."""

    workspace: Path
    servers: tuple[str, ...]  # node names of role server
    sites: tuple[str, ...]  # node names of role site


def throwaway_consortium(workspace: Path, *, servers: int, sites: int = 1) -> LocalConsortium:
    """A fresh CA in `workspace` with `servers` server nodes and `sites` site nodes."""
    from corolla.pki import ConsortiumCA  # the PKI imports libp2p; only pay for it here

    ca = ConsortiumCA.init(workspace, consortium="local")
    server_names = tuple(f"server-{i}" for i in range(servers))
    site_names = tuple(f"site-{i}" for i in range(sites))
    for name in server_names:
        ca.issue(name, "server")
    for name in site_names:
        ca.issue(name, "site")
    return LocalConsortium(workspace=workspace, servers=server_names, sites=site_names)


def default_model(workspace: Path, arch: Arch = "llama") -> Path:
    """The tiny model of `arch` in `workspace`, made once (atomically, under a file lock,
    so that several processes starting together agree on one checkpoint)."""
    target = workspace / "models" / f"tiny-{arch}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".tiny-{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tiny-{arch}-"))
            try:
                init_tiny(staging, TinySpec(arch=arch))
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target
