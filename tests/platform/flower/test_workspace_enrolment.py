"""Flower with the consortium's own identities, issued by `platform keys`.

The SuperLink's TLS certificate is the coordinator's (from the workspace CA); each site's
Flower node-auth key is certified in its identity certificate, and the coordinator
enrolls a key only after checking that certificate. Sites from another CA, revoked
sites and sites never enrolled cannot take part in a round.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from corolla.pki import CertificateError, ConsortiumCA
from corolla.platform.flower import (
    ControlClient,
    ProcessFailed,
    RunStatus,
    ServerTls,
    SuperLink,
    SuperLinkConfig,
    SuperNode,
    SuperNodeConfig,
)
from corolla.platform.flower.enrolment import enroll_site

APP = Path(__file__).parent / "app"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> ConsortiumCA:
    root = tmp_path_factory.mktemp("fed-ws")
    ca = ConsortiumCA.init(root / "ws", consortium="fed")
    ca.issue("coordinator", "coordinator", hosts=["127.0.0.1", "localhost"])
    for name in ("site-0", "site-1", "site-revoked", "site-unenrolled"):
        ca.issue(name, "site")
    ca.revoke("site-revoked")
    ConsortiumCA.init(root / "other", consortium="fed").issue("site-outsider", "site")
    return ca


@pytest.fixture(scope="module")
def federation(workspace: ConsortiumCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work_dir = tmp_path_factory.mktemp("fed-run")
    coordinator = workspace.node("coordinator")
    tls = ServerTls(
        ca_cert=coordinator.directory / "ca.pem",
        cert=coordinator.directory / "tls.pem",
        key=coordinator.directory / "tls.key",
    )
    with ExitStack() as stack:
        link = stack.enter_context(SuperLink(SuperLinkConfig(tls=tls, port=_free_port()), work_dir=work_dir))
        control = ControlClient(link.connection, work_dir=work_dir)
        verifier = coordinator.verifier()
        enrolled = {
            name: enroll_site(control, verifier, workspace.node(name).directory)[1] for name in ("site-0", "site-1")
        }
        nodes = {
            name: SuperNode(
                SuperNodeConfig(
                    superlink=link.connection,
                    auth_private_key=workspace.node(name).directory / "flower-auth.key",
                    runtime_port=_free_port(),
                    node_config={"partition-id": i},
                    name=name,
                ),
                work_dir=work_dir,
            )
            for i, name in enumerate(enrolled)
        }
        for node in nodes.values():
            stack.callback(node.stop)
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(SuperNode.start, nodes.values()))
        yield {"link": link, "control": control, "verifier": verifier, "enrolled": enrolled, "work_dir": work_dir}


def test_certified_sites_complete_a_round(federation: dict[str, object], tmp_path: Path) -> None:
    control: ControlClient = federation["control"]  # type: ignore[assignment]
    result_path = tmp_path / "result.json"
    run = control.run(APP, run_config={"result-path": str(result_path), "min-nodes": 2}, timeout=120)
    run.raise_for_status()
    assert run.status is RunStatus.COMPLETED
    partitions = json.loads(result_path.read_text())["partitions"]
    assert {int(k) for k in partitions} == set(federation["enrolled"].values())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "reason"), [("site-revoked", "revoked"), ("site-outsider", "not issued by the consortium CA")]
)
def test_uncertified_sites_are_not_enrolled(
    federation: dict[str, object], workspace: ConsortiumCA, name: str, reason: str
) -> None:
    directory = (
        (workspace.workspace / "nodes" / name)
        if name != "site-outsider"
        else workspace.workspace.parent / "other" / "nodes" / name
    )
    before = {i.node_id for i in federation["control"].list_supernodes()}  # type: ignore[union-attr]
    with pytest.raises(CertificateError, match=reason):
        enroll_site(federation["control"], federation["verifier"], directory)  # type: ignore[arg-type]
    assert {i.node_id for i in federation["control"].list_supernodes()} == before  # type: ignore[union-attr]


def test_a_swapped_flower_key_is_not_enrolled(
    federation: dict[str, object], workspace: ConsortiumCA, tmp_path: Path
) -> None:
    """A site offering another site's Flower key under its own certificate is refused."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "node.pem").write_bytes((workspace.node("site-unenrolled").directory / "node.pem").read_bytes())
    (mixed / "flower-auth.pub").write_bytes((workspace.node("site-0").directory / "flower-auth.pub").read_bytes())
    with pytest.raises(CertificateError, match="not the one its certificate names"):
        enroll_site(federation["control"], federation["verifier"], mixed)  # type: ignore[arg-type]


def test_unenrolled_site_cannot_join(federation: dict[str, object], workspace: ConsortiumCA) -> None:
    stranger = SuperNode(
        SuperNodeConfig(
            superlink=federation["link"].connection,  # type: ignore[union-attr]
            auth_private_key=workspace.node("site-unenrolled").directory / "flower-auth.key",
            runtime_port=_free_port(),
            node_config={"partition-id": 9},
            name="site-unenrolled",
        ),
        work_dir=federation["work_dir"],
    )  # type: ignore[arg-type]
    with pytest.raises(ProcessFailed, match="Failed to activate SuperNode"):
        stranger.start()
    assert not stranger.running
