"""The working area itself on an S3-compatible store (moto's server, IAM authentication on): a run's stages are
committed there (attempt prefix, commit record last), a host holding nothing but the store's credentials goes on
from them (the merged model bit-equal to the same run on local disk: `integration/test_hosts.py`), an attempt that
died half-way is never read, a retry resumes from the checkpoints on the store, and a wrong secret or a store that
does not answer fails naming the store or the setting, with nothing committed nor registered."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from s3fs import S3FileSystem

from lepton_tasks.config.specs import find_spec
from lepton_tasks.core import store as work_store
from lepton_tasks.core.errors import StoreAccessDenied, StoreUnavailable
from lepton_tasks.core.storage import atomic_dir
from lepton_tasks.orchestration import pipeline, result_links
from lepton_tasks.tools.airflow_env import free_port
from lepton_tasks.tools.demo_data import write_mnist1d
from lepton_tasks.tools.s3_server import BUCKET, S3Store

CONF = {"num_shards": 2, "merge_rounds": 2, "local_epochs": 1, "hidden_size": 16, "model_kind": "mlp"}
WORK = f"s3://{BUCKET}/work"
STAGES = ("ingest", "validate", "drift", "shard", "merge", "compress", "champion")


@pytest.fixture
def store(tmp_path, monkeypatch):
    started = S3Store.start(tmp_path)
    for name, value in started.environ().items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()
    yield started
    if started.process.poll() is None:
        started.stop()
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def on_store(tmp_path, store, monkeypatch):
    """The working area on the store, this host's copy in `scratch`; the demo data uploaded from outside it."""
    monkeypatch.setenv("LEPTON_DATA_ROOT", WORK)
    monkeypatch.setenv("LEPTON_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # shared by the hosts
    local = write_mnist1d(tmp_path / "outside", 900)
    return store.upload(local, "landing/mnist1d/part-0.parquet")


def _keys(store: S3Store, prefix: str) -> list[str]:
    pages = store.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _run_root(store: S3Store, run: str) -> str:
    return f"work/lepton_mnist1d/{run}"


def _another_host(tmp_path) -> None:
    """This host's copy of the working area gone (moved away): what a host sharing only the store starts from.
    Every host keeps its copy at the same path (LEPTON_SCRATCH), which the manifests name."""
    scratch = work_store.work_area().local
    scratch.rename(tmp_path / f"gone-{len(list(tmp_path.glob('gone-*')))}")


def test_a_run_commits_every_stage_on_the_store_and_another_host_goes_on_from_there(tmp_path, store, on_store,
                                                                                   monkeypatch):
    import mlflow

    ctx = pipeline.context(find_spec("lepton_mnist1d"), "on-store", {**CONF, "source_uri": on_store})
    first, _ = pipeline.run_in_process(ctx, last="train")
    keys = _keys(store, _run_root(store, "on-store"))
    for stage in ("ingest", "validate", "drift", "shard"):
        record = json.loads(store.client("s3").get_object(
            Bucket=BUCKET, Key=f"{_run_root(store, 'on-store')}/{stage}/_COMMITTED.json")["Body"].read())
        attempt = [k for k in keys if k.startswith(f"{_run_root(store, 'on-store')}/{stage}/attempt-")]
        assert attempt and all(f"/attempt-{record['attempt']}/" in k for k in attempt)  # one attempt, committed
        assert sorted(k.split(f"attempt-{record['attempt']}/", 1)[1] for k in attempt) == sorted(record["files"])
    assert any(k.endswith("round-02/merged.safetensors") for k in keys), keys  # checkpoints, one PUT each

    # another host retries train (this host's copy gone): every shard of every round found on the store
    _another_host(tmp_path)
    other = pipeline.context(ctx.loaded, ctx.run_id, ctx.params.model_dump())
    assert not other.paths.root.exists()
    done, _ = pipeline.run_in_process(other, last="compress", done={k: v for k, v in first.items() if k != "train"})
    resumed = [r["resumed"] for rnd in done["train"].rounds for r in rnd]
    assert resumed and all(resumed) and done["train"].merged == first["train"].merged

    # the store unreachable for good (its endpoint a closed port): register fails retryably, naming the store,
    # after LEPTON_STORE_PATIENCE_S, and registers nothing
    monkeypatch.setenv("LEPTON_STORE_PATIENCE_S", "4")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreUnavailable) as raised:
        pipeline.run_stage(other, "register", done)
    assert raised.value.retryable and BUCKET in str(raised.value) and "AWS_ENDPOINT_URL" not in str(raised.value)
    assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_registered_models() == []
    # the stage's own error kept (its summary on this host only), and the run's report made from this host's copies
    failed = pipeline.report(other)
    assert failed["failed_stage"] == "register" and failed["stages"]["register"]["error"].startswith("StoreUnavailable")
    assert failed["store_error"].startswith("StoreUnavailable") and other.paths.report.is_file()

    # back: its retry registers, and the report reads every summary from the store (both hosts')
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
    S3FileSystem.clear_instance_cache()
    done["register"] = pipeline.run_stage(other, "register", done)
    assert done["register"].model_version == "1"
    report = pipeline.report(other)
    assert [report["stages"][s]["status"] for s in pipeline.STAGES] == ["success"] * len(pipeline.STAGES)
    assert f"{_run_root(store, 'on-store')}/report.json" in _keys(store, _run_root(store, "on-store"))
    assert any(k.endswith("model.onnx") for k in _keys(store, "work/mlartifacts/"))  # MLflow's artifacts there too
    _another_host(tmp_path)  # the Airflow API server's host: the plugin serves the data docs from the store
    served = result_links.data_docs_file(work_store.work_area().local, ctx.dag_id, ctx.run_id, "index.html")
    assert served is not None and b"<html" in served.read_bytes().lower()


def test_an_attempt_that_died_half_way_is_never_read_and_the_next_commit_removes_it(tmp_path, store, on_store):
    stage_dir = work_store.work_area().local / "lepton_mnist1d" / "half" / "shard"
    with atomic_dir(stage_dir) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(stage_dir) as tmp:  # a worker uploaded a piece, then it died
        (tmp / "a.txt").write_text("second, never committed")
        work_store.put(tmp / "a.txt")
        raise RuntimeError("the task died")
    prefix = f"{_run_root(store, 'half')}/shard"
    assert len({k.split("/")[4] for k in _keys(store, prefix) if "/attempt-" in k}) == 2  # the dead one is there
    shutil.rmtree(work_store.work_area().local)  # another host reads: the committed attempt only
    work_store.checkout(stage_dir)
    assert (stage_dir / "a.txt").read_text() == "first"
    with atomic_dir(stage_dir) as tmp:
        (tmp / "a.txt").write_text("third")
    attempts = {k.split("/")[4] for k in _keys(store, prefix) if "/attempt-" in k}
    assert len(attempts) == 1 and work_store.committed(stage_dir)["attempt"] in next(iter(attempts))


def test_a_wrong_secret_names_the_setting_and_commits_nothing(store, on_store, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-wrong-secret")
    S3FileSystem.clear_instance_cache()
    stage_dir = work_store.work_area().local / "lepton_mnist1d" / "denied" / "ingest"
    with pytest.raises(StoreAccessDenied) as raised, atomic_dir(stage_dir) as tmp:
        (tmp / "part-0.parquet").write_bytes(b"rows")
    assert "AWS_SECRET_ACCESS_KEY" in str(raised.value) and "planted-wrong-secret" not in str(raised.value)
    assert WORK.split("://")[1].split("/")[0] in str(raised.value)
    assert not stage_dir.exists()  # nothing here either
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret)
    S3FileSystem.clear_instance_cache()
    assert _keys(store, _run_root(store, "denied")) == []
