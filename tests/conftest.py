"""Shared fixtures: tiny real data, a real Dask cluster, isolated data roots."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from lepton_tasks.config.settings import PIPELINES_DIR
from lepton_tasks.config.specs import load_spec
from lepton_tasks.tools.demo_data import mnist1d_frame

MNIST_SPEC = load_spec(PIPELINES_DIR / "lepton_mnist1d.yaml")
HOUSE_SPEC = load_spec(PIPELINES_DIR / "lepton_house_prices.yaml")


# The longest test files first (as measured in the suite here): `make test` runs three files at a time
# (`-n 3 --dist loadfile`), and a long file picked up last would be the suite's tail. test_hosts.py first: a third
# of its time is waiting (a cut link, a store outage, a store down for good), which the CPU-bound files fill.
SLOWEST_FIRST = ("test_hosts.py", "test_nightly.py", "test_end_to_end.py", "test_scheduler.py",
                 "test_production_deployment.py", "test_faults.py", "test_registry_faults.py",
                 "test_new_pipeline.py", "test_worker_faults.py", "test_dag_integrity.py", "test_concurrent_runs.py",
                 "test_dask_hosts.py", "test_own_model.py", "test_warehouse.py", "test_score.py",
                 "test_cluster.py", "test_store_work_area.py", "test_object_store_sources.py", "test_validate.py")


def pytest_collection_modifyitems(items) -> None:
    named = {path.name for path in Path(__file__).parent.rglob("test_*.py")}
    if stale := [name for name in SLOWEST_FIRST if name not in named]:  # a renamed file would drop to the tail
        raise pytest.UsageError(f"tests/conftest.py's SLOWEST_FIRST names no test file {stale}")
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("LEPTON_DATA_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def mnist_frame(rows: int = 600, seed: int = 7) -> pd.DataFrame:
    return mnist1d_frame(rows, seed)


def encoder_for(frame: pd.DataFrame, loaded=MNIST_SPEC):
    """The feature encoder a pipeline fits on `frame` (as the shard stage does on its training rows)."""
    from lepton_tasks.ml.features import fit, partition_stats

    return fit(loaded.spec, partition_stats(frame, loaded.spec))


@pytest.fixture
def mnist_parquet(tmp_path) -> Path:
    path = tmp_path / "landing" / "mnist1d.parquet"
    path.parent.mkdir(parents=True)
    mnist_frame().to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def dask_client():
    """A real two-worker Dask cluster of worker processes under nannies, configured as Lepton's own clusters. One
    per test module: kept for the whole session, an idle cluster costs about a tenth of a core for the rest of it."""
    from distributed import Client, LocalCluster

    from lepton_tasks.infra.cluster import worker_config

    with worker_config(), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def has_gpu() -> bool:
    """Whether torch itself can use a CUDA device (not merely whether the driver reports one)."""
    from lepton_tasks.infra.cluster import gpu_count

    return gpu_count() > 0


def postgres_url() -> str | None:
    return os.environ.get("LEPTON_TEST_POSTGRES_URL") or None


def postgres_server_url(what: str) -> str:
    """LEPTON_TEST_POSTGRES_URL; else, outside CI, the local default where something listens on its port. Once a
    server is configured or found, any failure (a refused login included) fails the test: only a machine with
    nothing configured skips, and CI, which always configures one, never does."""
    import socket
    from urllib.parse import urlsplit

    from lepton_tasks.tools.services import DEFAULT_POSTGRES

    url = os.environ.get("LEPTON_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"CI runs {what} on PostgreSQL: set LEPTON_TEST_POSTGRES_URL (.ci/run does)")
    default = urlsplit(DEFAULT_POSTGRES)
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex((default.hostname, default.port or 5432)) != 0:
            pytest.skip(f"no PostgreSQL configured: LEPTON_TEST_POSTGRES_URL is unset and nothing listens at "
                        f"{default.hostname}:{default.port or 5432}")
    return DEFAULT_POSTGRES
