"""Fixtures of the secure-aggregation tests: consortia with real certificates (made once)."""

from __future__ import annotations

import pytest

from tests.secure_agg.kit import Consortium


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    """A CA with 10 sites and a coordinator."""
    return Consortium.create(tmp_path_factory.mktemp("secagg-ws"), sites=10)


@pytest.fixture(scope="session")
def outsiders(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    """Another CA's sites and coordinator: not members of `consortium`."""
    return Consortium.create(tmp_path_factory.mktemp("secagg-other"), sites=2, name="other")
