"""The Flower app directory `platform train` submits: its config declares every TrainConfig
key, its components resolve from the installed package, and its FAB carries no code."""

from __future__ import annotations

import io
import subprocess
import sys
import tomllib
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate

from corolla.federation import app_dir
from corolla.training.config import TrainConfig


def test_the_app_declares_every_train_config_key_with_its_default() -> None:
    declared = tomllib.loads((app_dir() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Flower refuses run-config overrides for undeclared keys: a new TrainConfig field must be added here.
    assert declared == TrainConfig(model="", out_dir="").to_run_config()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")  # inside flwr build
def test_flower_finds_the_components_in_the_installed_package() -> None:
    config, _ = load_and_validate(app_dir() / "pyproject.toml")  # what `flwr run` checks, importing nothing
    components = config["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"] == "corolla.federation.coordinator.server_app:app"
    assert components["clientapp"] == "corolla.federation.site.client_app:app"
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir())))
    assert sorted(fab.namelist()) == [".info/CONTENT", "pyproject.toml"]


def test_the_apps_import_without_the_model_code() -> None:
    """A ClientApp process imports `client_app` for every message: it must stay light, and
    must load before `site`/`coordinator` exist or when they fail to import."""
    probe = (
        "import sys\n"
        "from flwr.clientapp import ClientApp\n"
        "from flwr.serverapp import ServerApp\n"
        "import corolla.federation.site.client_app as c\n"
        "import corolla.federation.coordinator.server_app as s\n"
        "assert isinstance(c.app, ClientApp) and isinstance(s.app, ServerApp)\n"
        "heavy = {'torch', 'corolla.federation.site.round', 'corolla.federation.coordinator.model'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
