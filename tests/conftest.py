from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import cluster as cluster_mod


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster_mod.Cluster]:
    """One controller and one agent (2 virtual GPUs) shared by the API tests.

    Tests keep out of each other's way by each using fresh users.
    """
    with cluster_mod.running(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def user(cluster: cluster_mod.Cluster) -> cluster_mod.User:
    return cluster.user()
