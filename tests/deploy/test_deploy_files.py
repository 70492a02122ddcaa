"""deploy/ checks that run without Docker, Kubernetes or systemd running: each file through the
tool that reads it (docker-compose, the Compose spec schema, kustomize + kubernetes-validate,
systemd-analyze, `platform config check`), and the ports of every node file against the
Compose services and the Kubernetes pods that run it.

A missing tool fails the test with how to install it: these checks must not silently vanish.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from corolla.platform.cli import main as platform_main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NODES = DEPLOY / "nodes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
CONFIG_IN_CONTAINER = "/etc/corolla/corolla.toml"
# The table of a node file that holds the flags of the command its service runs.
COMMAND_TABLES = {("serve",): "serve", ("swarm", "bootstrap"): "swarm.bootstrap", ("train",): "train"}
PORT_KEYS = ("port", "dht-port", "metrics-port")
COMPOSE_ENV = {**os.environ, "LEDGER_PASSWORD": "test-only-password"}


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {install} (.ci/run does)")
    return path


def _run(
    argv: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False)


def _node_files() -> list[Path]:
    files = sorted(NODES.glob("*.toml"))
    assert len(files) >= 8, f"expected the consortium's node files in {NODES}, found {[f.name for f in files]}"
    return files


def _table(doc: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    for part in dotted.split("."):
        doc = doc.get(part, {})
    return doc


def _ports(node_file: Path, command: tuple[str, ...]) -> dict[str, int]:
    table = _table(tomllib.loads(node_file.read_text()), COMMAND_TABLES[command])
    return {key: int(table[key]) for key in PORT_KEYS if key in table}


# --- node files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("node_file", _node_files(), ids=lambda p: p.name)
def test_every_node_file_passes_config_check(node_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = platform_main(["config", "check", str(node_file)])
    out = capsys.readouterr()
    assert code == 0, f"platform config check {node_file.name}: exit {code}: {out.err.strip()}"
    role = tomllib.loads(node_file.read_text())["node"]["role"]
    assert f"role {role}" in out.out


def test_the_consortium_has_every_role() -> None:
    roles = [tomllib.loads(f.read_text())["node"]["role"] for f in _node_files()]
    assert roles.count("bootstrap") == 1 and roles.count("coordinator") == 1
    assert roles.count("server") >= 3 and roles.count("site") >= 3
    servers = [tomllib.loads(f.read_text()) for f in _node_files() if f.name.startswith("server-")]
    spans = sorted(tuple(int(x) for x in s["serve"]["blocks"].split(":")) for s in servers)
    assert spans == [(0, 10), (10, 20), (20, 30)], "the servers must cover SmolLM2's 30 blocks once"
    coordinator = tomllib.loads((NODES / "coordinator.toml").read_text())
    assert coordinator["node"]["ledger"].startswith("postgresql://")


# --- Compose --------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _platform_services() -> Iterator[tuple[str, Mapping[str, Any], tuple[str, ...], Path]]:
    """(name, service, command words after --config FILE, node file) of each `platform` service."""
    for name, service in _compose()["services"].items():
        if service.get("entrypoint") != ["platform"]:
            continue
        words = list(service["command"])
        assert words[:2] == ["--config", CONFIG_IN_CONTAINER], f"{name}: start it as platform --config FILE COMMAND"
        mounts = [v for v in service["volumes"] if v.split(":")[1] == CONFIG_IN_CONTAINER]
        assert len(mounts) == 1, f"{name}: mount its deploy/nodes file at {CONFIG_IN_CONTAINER}"
        yield name, service, tuple(words[2:]), (COMPOSE.parent / mounts[0].split(":")[0]).resolve()


def test_docker_compose_accepts_the_file() -> None:
    exe = _tool("docker-compose", "apt-get install -y docker-compose")
    done = _run([exe, "-f", str(COMPOSE), "config", "-q"], env=COMPOSE_ENV)
    assert done.returncode == 0, done.stderr
    # The ledger password is never defaulted: without it the file is refused, naming it.
    bare = {k: v for k, v in COMPOSE_ENV.items() if k != "LEDGER_PASSWORD"}
    refused = _run([exe, "-f", str(COMPOSE), "config", "-q"], env=bare)
    assert refused.returncode != 0 and "LEDGER_PASSWORD" in refused.stderr


def _compose_spec_schema() -> dict[str, Any]:
    exe = _tool("docker-compose", "apt-get install -y docker-compose")
    shebang = Path(exe).read_text().splitlines()[0]
    python = shebang[2:].split()[0] if shebang.startswith("#!") else "python3"
    found = _run([python, "-c", "import compose.config, os; print(os.path.dirname(compose.config.__file__))"])
    schema = Path(found.stdout.strip()) / "compose_spec.json"
    if found.returncode != 0 or not schema.is_file():
        pytest.fail(f"the Compose spec schema of docker-compose is not at {schema}: apt-get install -y docker-compose")
    return dict(json.loads(schema.read_text()))


def test_compose_file_matches_the_compose_spec_schema() -> None:
    try:
        import jsonschema
    except ImportError:
        pytest.fail("jsonschema is not installed: pip install -e '.[dev]'")
    validator = jsonschema.Draft201909Validator(_compose_spec_schema())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    broken = _compose()
    broken["services"]["bootstrap"]["healthchek"] = broken["services"]["bootstrap"].pop("healthcheck")
    assert list(validator.iter_errors(broken)), "the schema must catch a misspelt key"


def test_compose_services_run_existing_node_files_on_their_ports() -> None:
    services = list(_platform_services())
    assert {name for name, *_ in services} >= {"bootstrap", "server-a", "server-b", "server-c", "coordinator"}
    for name, service, command, node_file in services:
        assert node_file.parent == NODES and node_file.is_file(), f"{name}: {node_file} is not a deploy/nodes file"
        ports = _ports(node_file, command)
        assert "metrics-port" in ports, f"{node_file.name}: a long-running node needs metrics-port"
        exposed = {int(p) for p in service.get("expose", [])}
        assert set(ports.values()) <= exposed, f"{name}: exposes {sorted(exposed)}, its file uses {ports}"
        health = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{ports['metrics-port']}/health" in health, f"{name}: health check port"


def test_compose_flower_and_ledger_services() -> None:
    services = _compose()["services"]
    assert services["ledger"]["image"] == "postgres:16"
    link = services["superlink"]
    assert link["entrypoint"] == ["flower-superlink"] and "--enable-supernode-auth" in link["command"]
    assert "https://127.0.0.1:9200/health" in " ".join(link["healthcheck"]["test"])
    sites = [n for n, s in services.items() if s.get("entrypoint") == ["flower-supernode"]]
    assert sorted(sites) == ["site-a", "site-b", "site-c"]
    for site in sites:
        words = " ".join(services[site]["command"])
        assert f"nodes/{site}/flower-auth.key" in words and f"node='{site}'" in words
        assert (NODES / f"{site}.toml").is_file()
    assert {"workspace", "models", "ledger"} <= set(_compose()["volumes"])


# --- Kubernetes -----------------------------------------------------------------------------------


@functools.cache
def _rendered() -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/k8s`, once per run (callers must not change what it returns)."""
    exe = _tool("kubectl", "apt-get install -y kubectl (or any kubectl with kustomize)")
    done = _run([exe, "kustomize", str(K8S)])
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def test_k8s_node_files_are_copies_of_deploy_nodes() -> None:
    copies = sorted(p.name for p in (K8S / "nodes").glob("*.toml"))
    assert copies == [p.name for p in _node_files()]
    for name in copies:
        assert (K8S / "nodes" / name).read_bytes() == (NODES / name).read_bytes(), (
            f"deploy/k8s/nodes/{name} differs from deploy/nodes/{name}: cp deploy/nodes/*.toml deploy/k8s/nodes/"
        )


def test_k8s_manifests_validate() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'")
    docs = _rendered()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("StatefulSet", "ledger"), ("StatefulSet", "superlink"), ("Deployment", "bootstrap"),
                     ("Deployment", "server-a"), ("Job", "train"), ("Service", "ledger")]:  # fmt: skip
        assert expected in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["replicaz"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_k8s_pods_run_their_node_files_on_their_ports() -> None:
    checked = 0
    for doc in _rendered():
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            args = container.get("args", [])
            if container.get("command") or args[:2] != ["--config", CONFIG_IN_CONTAINER]:
                continue
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_IN_CONTAINER)
            node_file = NODES / mount["subPath"]
            ports = _ports(node_file, tuple(args[2:]))
            declared = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert declared["metrics"] == ports["metrics-port"], f"{doc['metadata']['name']}: metrics port"
            assert set(ports.values()) <= set(declared.values())
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
            checked += 1
    assert checked == 5  # bootstrap, three servers, the training Job


# --- systemd --------------------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    exe = _tool("systemd-analyze", "apt-get install -y systemd")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    units = sorted(SYSTEMD.iterdir())
    assert {u.name for u in units} >= {
        "corolla-bootstrap.service",
        "corolla-serve@.service",
        "corolla-superlink.service",
        "corolla-supernode@.service",
        "corolla-train.service",
    }
    names = []
    for unit in units:
        text = unit.read_text()
        # systemd-analyze checks that ExecStart's binary exists; point it at stand-ins.
        for binary in set(re.findall(r"/opt/corolla/\.venv/bin/([\w-]+)", text)) - {p.name for p in bin_dir.iterdir()}:
            (bin_dir / binary).symlink_to("/bin/true")
        name = unit.name.replace("@.", "@example.")
        (tmp_path / name).write_text(text.replace("/opt/corolla/.venv/bin/", f"{bin_dir}/"))
        names.append(name)
        if unit.suffix == ".service":
            assert "NoNewPrivileges=true" in text and "ProtectSystem=strict" in text and "StateDirectory=" in text
            assert "User=corolla" in text
    done = _run([exe, "verify", "--man=no", *names], cwd=tmp_path)
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert done.returncode == 0 and done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr
    assert "--config /etc/corolla/%i.toml serve" in (SYSTEMD / "corolla-serve@.service").read_text()


# --- images ---------------------------------------------------------------------------------------


def test_dockerfiles() -> None:
    cpu = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert cpu.startswith("#") and "FROM python:3.11-slim" in cpu
    torch_line = cpu.index("download.pytorch.org/whl/cpu torch==2.13.0")
    assert torch_line < cpu.index("pip install ."), "torch's CPU wheel must come before the package"
    cuda = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    assert "FROM nvidia/cuda:" in cuda and "torch==2.13.0" in cuda and "bitsandbytes" in cuda
    for text in (cpu, cuda):
        assert 'ENTRYPOINT ["platform"]' in text and "\nUSER corolla\n" in text
        assert '"/var/lib/corolla", "/models"' in text
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None and f"torch=={pinned.group(1)}" in cpu, "the image's torch must be the project's pin"
