"""Sources and MLflow artifacts on an S3-compatible store (moto's server, IAM authentication on), the credentials
only in the standard AWS environment: a pipeline reads its source there and registers through an MLflow server
whose artifacts are on the store (proxied: the run's own process then holds no credentials), the scaffold profiles
a source there, a wrong secret and a store that does not answer fail clearly, and the secret ends up in nothing
the run wrote."""

from __future__ import annotations

import pytest
from s3fs import S3FileSystem

from lepton_tasks.config.specs import find_spec
from lepton_tasks.core.errors import StoreAccessDenied, StoreUnavailable
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.orchestration import pipeline
from lepton_tasks.tools.airflow_env import TrackingServer
from lepton_tasks.tools.demo_data import write_mnist1d
from lepton_tasks.tools.s3_server import S3Store

CONF = {"num_shards": 2, "merge_rounds": 1, "local_epochs": 1, "hidden_size": 16, "model_kind": "mlp"}


@pytest.fixture
def store(tmp_path, monkeypatch):
    started = S3Store.start(tmp_path)
    for name, value in started.environ().items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()  # s3fs keeps one client per argument set, whatever the environment says
    yield started
    if started.process.poll() is None:
        started.stop()
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def landed(tmp_path, store):
    """The demo data, written outside the store and uploaded to it; (local file, its URI on the store)."""
    local = write_mnist1d(tmp_path / "outside", 900)
    return local, store.upload(local, "landing/mnist1d/part-0.parquet")


def _files_holding(root, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_pipeline_reads_its_source_on_the_store_and_registers_through_mlflow_proxying_it(tmp_path, data_root, store,
                                                                                         landed, monkeypatch):
    local, uri = landed
    ctx = pipeline.context(find_spec("lepton_mnist1d"), "from-s3", {**CONF, "source_uri": "s3://lepton/landing/mnist1d/"})
    manifests, _ = pipeline.run_in_process(ctx, last="ingest")
    ingest = manifests["ingest"]
    assert ingest.source_files == [uri.removeprefix("s3://")] and ingest.rows == 900
    assert ingest.window[0]["files"][0]["sha256"] == sha256_file(local)  # the bytes read are the bytes uploaded

    (tmp_path / "mlflow").mkdir()
    server = TrackingServer(tmp_path / "mlflow", "s3://lepton/mlartifacts", store.environ())
    server.start()
    try:
        for name in store.environ():  # from here on this process holds no store credential: MLflow proxies
            monkeypatch.delenv(name)
        S3FileSystem.clear_instance_cache()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        ctx = pipeline.context(ctx.loaded, ctx.run_id, ctx.params.model_dump())  # the same run, these settings
        manifests, _ = pipeline.run_in_process(ctx, done=manifests)
    finally:
        server.stop()
    registered = manifests["register"]
    assert registered.tracking_uri == server.uri and "champion" in registered.aliases
    stored = [o["Key"] for o in store.client("s3").list_objects_v2(Bucket="lepton", Prefix="mlartifacts/")["Contents"]]
    assert any(key.endswith("model.onnx") for key in stored), stored  # the compressed model, on the store
    written = [m.to_dict() for m in manifests.values()]
    assert store.secret not in str(written) and not _files_holding(data_root, store.secret)


def test_the_scaffold_profiles_a_source_on_the_store(tmp_path, data_root, store, landed, monkeypatch):
    from lepton_tasks.tools.new_pipeline import new_pipeline

    monkeypatch.setenv("LEPTON_EXPECTATIONS_DIR", str(tmp_path / "expectations"))
    made = new_pipeline("from_s3", "s3://lepton/landing/mnist1d/", "label", data_root, tmp_path / "pipelines",
                        tmp_path / "expectations")
    assert "s3://lepton/landing/mnist1d/" in made.spec_path.read_text()
    assert made.suite_path.exists() and not _files_holding(tmp_path, store.secret)


def test_a_wrong_secret_names_the_setting_not_the_secret_and_writes_nothing(data_root, store, landed,
                                                                             monkeypatch):
    wrong = "not-the-secret-" + store.secret[:8][::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    ctx = pipeline.context(find_spec("lepton_mnist1d"), "wrong-key", {**CONF, "source_uri": landed[1]})
    with pytest.raises(Exception) as raised:  # noqa: B017 (the stage's error is the cause, checked below)
        pipeline.run_in_process(ctx, last="ingest")
    error = raised.value.__cause__
    assert isinstance(error, StoreAccessDenied) and not error.retryable  # so Airflow does not retry it either
    message = str(raised.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "s3://lepton" in message
    assert wrong not in message and store.secret not in message
    assert not ctx.stage_dir("ingest").exists()  # nothing half-written
    assert not _files_holding(data_root, wrong)


def test_a_store_that_does_not_answer_is_named_and_retryable(data_root, store, landed):
    store.stop()
    ctx = pipeline.context(find_spec("lepton_mnist1d"), "store-down", {**CONF, "source_uri": landed[1]})
    with pytest.raises(StoreUnavailable) as raised:
        pipeline.run_in_process(ctx, last="ingest")
    assert store.endpoint in str(raised.value) and "s3://lepton" in str(raised.value) and raised.value.retryable
    assert not ctx.stage_dir("ingest").exists()


def test_a_store_that_stops_answering_mid_read_is_named_and_retryable(store, landed):
    from lepton_tasks.data.sources import list_source_files, read_batches

    fs, files = list_source_files(landed[1])
    store.stop()
    with pytest.raises(StoreUnavailable, match="s3://lepton") as raised:
        list(read_batches(fs, files[0]))
    assert raised.value.retryable
