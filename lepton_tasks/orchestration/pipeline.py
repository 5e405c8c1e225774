"""The pipeline's graph, declared once (`GRAPH`), and one function per stage: parse params, locate the run folder,
call the stage, record a summary.

The DAG factory (`dags/lepton_pipelines.py`) makes each `Stage` a task whose body is `run_task`, the one place
where manifests cross XCom (typed in, plain mapping out); `run_in_process` runs the same graph in one process,
for scripts, benchmarks and tests. Nothing here imports Airflow at module level. Each stage's summary lands in
`{run}/summaries/{stage}.json` (failed ones too), and `report` assembles them into `{run}/report.json`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from lepton_tasks.config.settings import RunParams, Settings, parse_params
from lepton_tasks.config.specs import LoadedSpec, PipelineSpec
from lepton_tasks.core import store
from lepton_tasks.core.errors import LeptonError
from lepton_tasks.core.storage import RunPaths, read_json_if_exists, write_json
from lepton_tasks.data.manifests import (
    CompressManifest,
    DriftManifest,
    IngestManifest,
    Manifest,
    MergeManifest,
    RegisterManifest,
    ShardInfo,
    ShardManifest,
    TrainManifest,
    ValidationManifest,
    WaitManifest,
    WarmStart,
    pick,
)
from lepton_tasks.data.warehouse import SqlSource
from lepton_tasks.data.windows import DaySource, parse_ds
from lepton_tasks.ml.strategies import STRATEGIES

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Manifest)


@dataclass(frozen=True)
class RunContext:
    """Who is running (DAG and run ids), which pipeline spec, with which params, where."""

    loaded: LoadedSpec
    dag_id: str
    run_id: str
    params: RunParams
    settings: Settings
    ds: dt.date | None = None  # the run's date (Airflow's `ds`): what a date-templated source reads
    alarm: Callable[[str], None] = log.warning  # hears a drift over drift_max: in a task, the spec's notifiers

    @property
    def spec(self) -> PipelineSpec:
        return self.loaded.spec

    @property
    def day(self) -> dt.date:
        """The date a templated source is read for: `ds`, or today for a run outside Airflow without one."""
        return self.ds or dt.date.today()

    @property
    def paths(self) -> RunPaths:
        return RunPaths.of(self.settings.data_root, self.dag_id, self.run_id)

    def stage_dir(self, stage: str) -> Path:
        return self.paths.stage(stage)

    def summary_path(self, stage: str) -> Path:
        return self.paths.root / "summaries" / f"{stage}.json"


def context(loaded: LoadedSpec, run_id: str, raw_params: dict | None = None, dag_id: str | None = None,
            ds: dt.date | str | None = None) -> RunContext:
    params = parse_params(raw_params, loaded.spec.run_defaults())
    return RunContext(loaded, dag_id or loaded.name, run_id, params, Settings.from_env(),
                      parse_ds(ds) if ds is not None else None)


def from_airflow(task_context: dict[str, Any], loaded: LoadedSpec) -> RunContext:
    """The RunContext of the Airflow task whose context Airflow handed the task function."""
    try:
        ctx = context(loaded, task_context["run_id"], dict(task_context["params"]), task_context["dag"].dag_id,
                      run_date(task_context))
    except LeptonError as err:
        raise _without_retry(err) from err
    return replace(ctx, alarm=partial(_notify_drift, loaded, task_context))


def _notify_drift(loaded: LoadedSpec, task_context: dict[str, Any], message: str) -> None:
    from lepton_tasks.orchestration import notify

    notify.send(loaded.spec, "drift", task_context, message)


def run_date(task_context: dict[str, Any]) -> dt.date:
    """Airflow's `ds`; a run triggered without a logical date (Airflow 3 allows it) is dated by its run_after."""
    if task_context.get("ds"):
        return parse_ds(task_context["ds"])
    return task_context["dag_run"].run_after.date()


def _without_retry(err: LeptonError) -> Exception:
    """Bad input fails the same way every time: tell Airflow not to retry it."""
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # not under Airflow
        return err
    return AirflowFailException(f"{type(err).__name__}: {err}")


def _run_stage(ctx: RunContext, stage: str, body: Callable[[], M]) -> M:
    """Time `body`, write the stage summary (the manifest's figures, or the error), return its manifest. A summary
    that cannot be written (the store failing) fails the stage as its body failing would."""
    started = time.perf_counter()
    try:
        manifest = body()
        summary = {"status": "success", "seconds": round(time.perf_counter() - started, 3), **manifest.summary()}
        write_json(ctx.summary_path(stage), summary)
    except Exception as err:
        _fail(ctx, stage, err, time.perf_counter() - started)
    log.info("%s summary:\n%s", stage, summary_table(summary))
    return manifest


def _fail(ctx: RunContext, stage: str, err: Exception, seconds: float) -> NoReturn:
    """Write the stage's failure summary and raise `err`: a LeptonError that is not retryable without Airflow's
    retries; a service that is down, or a bug, as it is (Airflow's retries apply)."""
    summary = {"status": "failed", "seconds": round(seconds, 3), "error": f"{type(err).__name__}: {err}",
               **getattr(err, "figures", {})}
    if not isinstance(err, LeptonError):
        summary["traceback"] = traceback.format_exc(limit=5)
    # where the store itself failed, the summary stays on this host: putting it there would wait out the store's
    # patience again, and then raise the store's error in place of the stage's own
    with store.this_host_only() if isinstance(err, store.STORE_ERRORS) else nullcontext():
        write_json(ctx.summary_path(stage), summary)
    if isinstance(err, LeptonError) and not err.retryable:
        raise _without_retry(err) from err
    raise err


def summary_table(summary: dict, width: int = 72) -> str:
    """A stage summary as a two-column table for the task log (nested figures flattened, long values cut)."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            rows.append((prefix, text if len(text) <= width else text[:width - 3] + "..."))

    walk("", summary)
    key_width = max(len(k) for k, _ in rows)
    rule = f"+{'-' * (key_width + 2)}+{'-' * (width + 2)}+"
    return "\n".join([rule, *(f"| {k:<{key_width}} | {v:<{width}} |" for k, v in rows), rule])


def _tensors(shards: ShardManifest, split: ShardInfo, max_rows: int | None = None):
    """One split's rows (the held-out split, the selection split, a shard), encoded as the shards were."""
    from lepton_tasks.ml.tensors import load_xy

    return load_xy(split.files, shards.encoder, max_rows=max_rows)


CALIBRATION_ROWS = 1024  # encoded training rows (from the first shard) that static int8 quantization calibrates on


def _shape(ctx: RunContext, shards: ShardManifest):
    from lepton_tasks.ml.tensors import model_shape

    return model_shape(shards.encoder, ctx.spec.model_kind(ctx.params), ctx.params.hidden_size,
                       ctx.spec.training.model_kwargs)


def sql_source(ctx: RunContext) -> SqlSource | None:
    """The spec's SQL table or query when the run reads it (its `source_uri` is the spec's `sql://CONN_ID/...`),
    else None: files, those of the spec or a URI given for this run."""
    sql, uri = ctx.spec.source.sql, ctx.params.source_uri
    if sql is not None and uri == sql.uri:
        return sql
    if uri.startswith("sql://"):
        from lepton_tasks.core.errors import BadParam

        raise BadParam(f"param 'source_uri' ('{uri}') names a SQL source, which only a spec can define (this "
                       f"pipeline's source is {ctx.spec.source.run_uri}); give a file URI to read files instead")
    return None


def window(ctx: RunContext) -> list[DaySource]:
    from lepton_tasks.data.warehouse import window_days
    from lepton_tasks.data.windows import resolve

    if (sql := sql_source(ctx)) is not None:
        return window_days(sql, ctx.day, ctx.params.window_days)
    return resolve(ctx.params.source_uri, ctx.day, ctx.params.window_days)


def missing_days(ctx: RunContext) -> list[DaySource]:
    """The days of the run's window that have no data yet (no file, or no row in the table)."""
    from lepton_tasks.data import warehouse
    from lepton_tasks.data.sources import missing

    if (sql := sql_source(ctx)) is not None:
        return warehouse.missing_days(sql, window(ctx))
    return missing(window(ctx), ctx.settings.data_root, ctx.spec.source.format)


def absolute(ctx: RunContext, days: list[DaySource]) -> list[DaySource]:
    from lepton_tasks.data.sources import resolve_uri

    return [DaySource(d.day, resolve_uri(d.uri, ctx.settings.data_root)) for d in days]


def wait(ctx: RunContext, absent: list[DaySource]) -> WaitManifest:
    """The wait task's outcome: every day present, or a failure naming the missing ones (nothing after runs)."""
    from lepton_tasks.core.errors import BadSource
    from lepton_tasks.data.windows import describe

    def body() -> WaitManifest:
        if absent:
            minutes = ctx.params.wait_timeout_minutes
            waited = f" after waiting {minutes:g} min" if minutes else ""
            raise BadSource(f"no data for {len(absent)} day(s) of the window ending {ctx.day}{waited}: "
                            f"{describe(absent)}")
        return WaitManifest(str(ctx.day), [d.to_dict() for d in window(ctx)])

    return _run_stage(ctx, "wait", body)


def ingest(ctx: RunContext) -> IngestManifest:
    from lepton_tasks.stages import ingest as stage

    expected = {c: "numeric" if kind == "numeric" else "any" for c, kind in ctx.spec.features.items()}
    expected[ctx.spec.target.column] = "numeric" if ctx.spec.target.task == "regression" else "any"

    def body() -> IngestManifest:
        if ctx.spec.training.model:  # a model of the pipeline's own fails here, before any data is read
            from lepton_tasks.ml.models import check_spec_model

            check_spec_model(ctx.spec, ctx.params)
        if (sql := sql_source(ctx)) is not None:
            return stage.ingest_sql(sql, ctx.stage_dir("ingest"), expected, ctx.day, ctx.params.window_days)
        return stage.ingest(ctx.params.source_uri, ctx.settings.data_root, ctx.stage_dir("ingest"),
                            ctx.spec.source.format, expected, ctx.day, ctx.params.window_days)

    return _run_stage(ctx, "ingest", body)


def start_cluster(ctx: RunContext) -> dict:
    """The run's Dask cluster (the DAG's setup task), shared by partitioned validation, shard and train. Its workers
    import GX as they start, beside ingest, when the source is big enough for validation to be partitioned."""
    from lepton_tasks.infra.cluster import start_run_cluster

    return start_run_cluster(ctx.settings, _cluster_dir(ctx), ctx.params.num_shards,
                             validation=validation_partitioned(ctx))


def validation_partitioned(ctx: RunContext) -> bool:
    """Whether validate will likely partition this run's rows on the cluster (its own rule, on the source)."""
    return source_decoded_bytes(ctx) > ctx.settings.validate_memory_bytes


def source_decoded_bytes(ctx: RunContext) -> int:
    """About what the run's source takes decoded, before ingest has read it: Parquet files' uncompressed size from
    their footers, text files' size on disk (text is no smaller than its decoded values); 0 where the source cannot
    be listed (ingest then says why)."""
    from lepton_tasks.core.storage import parquet_decoded_bytes
    from lepton_tasks.data.sources import list_source_files, resolve_uri

    total = 0
    if sql_source(ctx) is not None:
        return total  # a table's size is the database's to tell; validate partitions the extract if it is big
    for day in window(ctx):
        try:
            fs, files = list_source_files(resolve_uri(day.uri, ctx.settings.data_root), ctx.spec.source.format)
            for path in files:
                total += parquet_decoded_bytes(fs, path) if path.endswith(".parquet") else fs.size(path)
        except Exception as err:  # a missing or unreadable source: the cluster starts plain, ingest fails clearly
            log.debug("could not size %s: %s", day.uri, err)
    return total


def await_cluster(ctx: RunContext) -> dict | None:
    """The run's cluster once its setup task has it up (validate, which runs beside that task, needs it only when
    it partitions); None when it never came."""
    from lepton_tasks.infra.cluster import await_run_cluster

    return await_run_cluster(ctx.settings, _cluster_dir(ctx))


def _cluster_dir(ctx: RunContext) -> Path:
    """Where the run's cluster keeps its scheduler file and log."""
    return ctx.paths.cluster


def stop_cluster(run_cluster: dict) -> None:
    """Stop the run's Dask cluster (the DAG's teardown task, which runs whether the run failed or not)."""
    from lepton_tasks.infra.cluster import stop_run_cluster

    stop_run_cluster(run_cluster)


RunCluster = Callable[[], dict | None]  # the run's cluster when a stage needs it: started, awaited, or None


def validate(ctx: RunContext, ingested: IngestManifest, cluster: RunCluster) -> ValidationManifest:
    """Validate in memory up to LEPTON_VALIDATE_MEMORY_BYTES, else partition by partition on the run's cluster
    (which `cluster` starts or awaits only then)."""
    from lepton_tasks.core.storage import decoded_bytes
    from lepton_tasks.infra.cluster import EXTERNAL, dask_client, recovering, restart_without_validation
    from lepton_tasks.stages import validate as stage

    def body() -> ValidationManifest:
        run = partial(stage.validate, ingested.parts, ctx.spec.suite_file, ctx.stage_dir("validate"),
                      ctx.params.quarantine_max_fraction)
        size = decoded_bytes(ingested.parts)
        if size <= ctx.settings.validate_memory_bytes:
            return run()
        log.info("the stage decodes to %.1f GiB, over LEPTON_VALIDATE_MEMORY_BYTES (%.1f GiB): validating it "
                 "partition by partition on Dask", size / 2**30, ctx.settings.validate_memory_bytes / 2**30)
        run_cluster = cluster()
        with dask_client(ctx.settings, ctx.params.num_shards, run_cluster) as client:
            manifest = recovering(client, "validate", lambda attempt: run(client=client))
            if run_cluster and run_cluster.get("kind") != EXTERNAL:  # never another deployment's shared workers
                restart_without_validation(client)
            return manifest

    return _run_stage(ctx, "validate", body)


def take_champion_snapshot(ctx: RunContext):
    """Copy the current champion's files into the run (once: a retry reads the same copy), for drift to compare
    with and for a warm start to begin from."""
    from lepton_tasks.infra.connections import mlflow_auth_env, mlflow_tracking_uri
    from lepton_tasks.ml import champion

    os.environ.update(mlflow_auth_env())
    return champion.snapshot(mlflow_tracking_uri(ctx.settings), ctx.spec.registered_model_name,
                             ctx.paths.root / "champion")


def drift(ctx: RunContext, validated: ValidationManifest) -> DriftManifest:
    """Snapshot the champion, then measure how far the validated rows moved from its data and write the drift
    report; the drift module decides what a drift over `drift_max` means (`ctx.alarm` hears of it)."""
    from lepton_tasks.stages import drift as stage

    def body() -> DriftManifest:
        found = take_champion_snapshot(ctx)
        measured = stage.measure(validated.parts, ctx.spec, ctx.stage_dir("drift"), found, ctx.params.drift_max,
                                 ctx.params.drift_action)
        log.info("%s", stage.verdict(measured))
        stage.decide(measured, ctx.alarm)
        return measured

    return _run_stage(ctx, "drift", body)


def warm_start(ctx: RunContext, drifted: DriftManifest | None) -> WarmStart:
    """Where round 1 starts, as the champion module decides it from the snapshot the drift stage took."""
    from lepton_tasks.ml import champion

    found = champion.Snapshot.of(drifted.champion, drifted.champion_unusable) if drifted else champion.Snapshot(None)
    return champion.warm_start(found, ctx.spec, ctx.params)


def shard(ctx: RunContext, validated: ValidationManifest, drifted: DriftManifest | None,
          cluster: RunCluster) -> ShardManifest:
    from lepton_tasks.infra.cluster import dask_client, recovering
    from lepton_tasks.stages import shard as stage

    def body() -> ShardManifest:
        start = warm_start(ctx, drifted)
        log.info("warm start: %s", start.reason)
        with dask_client(ctx.settings, ctx.params.num_shards, cluster()) as client:
            return recovering(client, "shard", lambda attempt: stage.shard(
                validated.parts, ctx.stage_dir("shard"), ctx.params.num_shards, ctx.params.eval_fraction,
                ctx.params.seed, ctx.spec, client, start, ctx.params.shard_by,
                STRATEGIES[ctx.params.merge_strategy].select_fraction))

    return _run_stage(ctx, "shard", body)


def train(ctx: RunContext, shards: ShardManifest, cluster: RunCluster) -> TrainManifest:
    from lepton_tasks.infra.cluster import dask_client
    from lepton_tasks.stages import train as stage

    def body() -> TrainManifest:
        with dask_client(ctx.settings, ctx.params.num_shards, cluster()) as client:
            return stage.train(shards.shards, shards.encoder, _shape(ctx, shards), ctx.params, ctx.stage_dir("train"),
                               client, ctx.settings.train_threads, shards.warm_start, client.dashboard_link)

    return _run_stage(ctx, "train", body)


def merge(ctx: RunContext, shards: ShardManifest, trained: TrainManifest) -> MergeManifest:
    from lepton_tasks.stages import merge as stage

    return _run_stage(ctx, "merge", lambda: stage.merge(
        trained.rounds, trained.merged, _shape(ctx, shards), _tensors(shards, shards.eval), ctx.stage_dir("merge"),
        ctx.spec.metric, ctx.params.local_epochs, shards.encoder.get("classes", []), shards.shards,
        ctx.params.merge_strategy, _tensors(shards, shards.select) if shards.select else None))


def compress(ctx: RunContext, shards: ShardManifest, merged: MergeManifest) -> CompressManifest:
    from lepton_tasks.stages import compress as stage

    return _run_stage(ctx, "compress", lambda: stage.compress(
        Path(merged.merged_path), merged.merged_sha256, _shape(ctx, shards), _tensors(shards, shards.eval),
        ctx.stage_dir("compress"), ctx.spec.metric, ctx.params.compression_tolerance, ctx.params.prune_sparsity,
        _tensors(shards, shards.shards[0], CALIBRATION_ROWS)[0].numpy()))


def register(ctx: RunContext, ingested: IngestManifest, validated: ValidationManifest, drifted: DriftManifest | None,
             shards: ShardManifest, trained: TrainManifest, merged: MergeManifest,
             compressed: CompressManifest) -> RegisterManifest:
    from lepton_tasks.infra.connections import mlflow_auth_env, mlflow_tracking_uri
    from lepton_tasks.stages import register as stage

    def body() -> RegisterManifest:
        os.environ.update(mlflow_auth_env())  # read by the MLflow client; never logged
        record = stage.RunRecord(ctx.dag_id, ctx.run_id, ctx.params.model_dump(), str(ctx.loaded.path),
                                 ctx.loaded.sha256, ingested, validated, shards, trained, merged, compressed, drifted)
        return stage.register(record, mlflow_tracking_uri(ctx.settings), ctx.spec.experiment_name,
                              ctx.spec.registered_model_name, _artifact_root(ctx.settings),
                              _tensors(shards, shards.eval, stage.EXAMPLE_ROWS)[0], ctx.spec.approval_required)

    return _run_stage(ctx, "register", body)


@dataclass(frozen=True)
class Stage:
    """One node of the pipeline graph: the DAG factory makes it a task, `run_in_process` a step."""

    name: str  # the task id, the stage folder and the summary's name
    run: Callable[..., Manifest]  # (ctx, *the inputs' manifests[, cluster]) -> this stage's manifest
    manifest: type[Manifest]
    inputs: tuple[str, ...] = ()  # the upstream stages whose manifests it takes, in order
    cluster: str | None = None  # "after": runs once the run's cluster is up; "beside": awaits it only if needed
    outlet: str | None = None  # the Asset (by role, see the DAG file) its manifest's `asset_event` updates
    doc: str = ""


GRAPH: tuple[Stage, ...] = (
    Stage("ingest", ingest, IngestManifest,
          doc="Copy the source (params.source_uri) into this run's immutable Parquet stage; row count, schema and "
              "checksums in the manifest."),
    Stage("validate", validate, ValidationManifest, ("ingest",), cluster="beside", outlet="validated_data",
          doc="Run the pipeline's Great Expectations suite; result JSON and HTML data docs in the run folder (extra "
              "link *Data docs*). A failed expectation stops the run, naming it and its column. A stage too large "
              "for memory is validated on the run's cluster, waited for only then."),
    Stage("drift", drift, DriftManifest, ("validate",),
          doc="Compare the validated rows with the champion's data (PSI per feature and label; extra link *Drift "
              "report*); over params.drift_max, notify, and stop here when params.drift_action is `fail`."),
    Stage("shard", shard, ShardManifest, ("validate", "drift"), cluster="after",
          doc="Split the validated rows on Dask into stratified Parquet shards and a held-out split, with a "
              "manifest (rows, label histograms, checksums); a warm start encodes with the champion's encoder."),
    Stage("train", train, TrainManifest, ("shard",), cluster="after",
          doc="Train one model per shard on the Dask workers, round after round from the last merge; a retry "
              "resumes from the checkpoints that exist (extra link *Dask dashboard*)."),
    Stage("merge", merge, MergeManifest, ("shard", "train"),
          doc="The last round's global model (or a greedy soup); score it and the shard models on held-out rows."),
    Stage("compress", compress, CompressManifest, ("shard", "merge"),
          doc="Prune, export to ONNX, quantize to int8; keep the smallest variant within the tolerance."),
    Stage("register", register, RegisterManifest,
          ("ingest", "validate", "drift", "shard", "train", "merge", "compress"),
          doc="Log the run to MLflow (one run per DAG run), register the model, move `candidate`, and `champion` "
              "only if it is at least as good on the same held-out rows (extra links *MLflow run*, *model "
              "version*)."),
)
STAGES = ("wait", *(s.name for s in GRAPH))  # every stage with a summary, in run order
MANIFESTS: dict[str, type[Manifest]] = {"wait": WaitManifest, **{s.name: s.manifest for s in GRAPH}}
BY_NAME = {s.name: s for s in GRAPH}


def run_task(stage: Stage, loaded: LoadedSpec, task_context: dict[str, Any], upstream: tuple[dict, ...]) -> dict:
    """The XCom boundary: an Airflow task's upstream manifests (plain mappings, with the run's cluster last where
    the stage runs after it) in, the stage's manifest out as a mapping; its Asset event set."""
    ctx = from_airflow(task_context, loaded)
    manifests = {name: MANIFESTS[name].from_dict(raw) for name, raw in zip(stage.inputs, upstream, strict=False)}
    if stage.cluster == "after":
        run_cluster = upstream[len(stage.inputs)]
        manifest = _run(stage, ctx, manifests, lambda: run_cluster)
    else:  # "beside" awaits the run's cluster only when it needs one
        manifest = _run(stage, ctx, manifests, lambda: await_cluster(ctx))
    if stage.outlet:
        task_context["outlet_events"][task_context["task"].outlets[0]].extra = manifest.asset_event()
    return manifest.to_dict()


def run_stage(ctx: RunContext, name: str, manifests: dict[str, Manifest], cluster: RunCluster | None = None
              ) -> Manifest:
    """Stage `name` of `GRAPH` in this process, its inputs taken by name from `manifests` (and `cluster`, the run's
    Dask cluster, where it uses one: by default, one of its own)."""
    return _run(BY_NAME[name], ctx, manifests, cluster or (lambda: None))


def _run(stage: Stage, ctx: RunContext, manifests: dict[str, Manifest], cluster: RunCluster) -> Manifest:
    """`stage` on its inputs' manifests, and the run's cluster where it uses one. Where the working area is an
    object store, this host first holds its copy of the input stages' folders (and the champion's snapshot),
    except for a stage that runs on the cluster: its workers fetch what they read, the task only footers."""
    started = time.perf_counter()
    try:
        for folder in ("champion", *stage.inputs) if stage.cluster != "after" else ():
            store.checkout(ctx.stage_dir(folder))
    except store.STORE_ERRORS as err:  # the stage's own failure: said in its summary
        _fail(ctx, stage.name, err, time.perf_counter() - started)
    inputs: list[Any] = [manifests[upstream] for upstream in stage.inputs]
    return stage.run(ctx, *inputs, *([cluster] if stage.cluster else []))


def run_in_process(ctx: RunContext, last: str = "register", done: dict[str, Manifest] | None = None
                   ) -> tuple[dict[str, Manifest], dict[str, float]]:
    """Every stage up to `last`, one after another in this process, wired as the DAG wires them (one Dask cluster
    for the run, started before shard, or by validate when it partitions): the manifests and each stage's wall
    seconds (`cluster`: its start before shard or train, which the DAG's setup task pays). `done`: manifests of
    the first stages, from a run over the same data and stage params (benchmarks comparing merge strategies): the
    run goes on after them. For plain scripts, benchmarks and tests (the DAG runs each in a task)."""
    manifests, seconds, cluster = dict(done or {}), {}, {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = step()
        seconds[name] = time.perf_counter() - started
        return result

    def run_cluster() -> dict:
        if not cluster:
            cluster.update(start_cluster(ctx))
        return cluster

    try:
        if "wait" not in manifests:
            manifests["wait"] = timed("wait", lambda: wait(ctx, missing_days(ctx)))
        for stage in GRAPH[:[s.name for s in GRAPH].index(last) + 1]:
            if stage.name in manifests:
                continue
            if stage.cluster == "after" and not cluster:
                timed("cluster", run_cluster)  # apart from the stage, as the DAG's setup task
            manifests[stage.name] = timed(stage.name, partial(run_stage, ctx, stage.name, manifests, run_cluster))
    finally:
        if cluster:
            stop_cluster(cluster)
    return manifests, seconds


def champion_event(night: dt.date, registered: RegisterManifest) -> dict:
    """The champion-model Asset event for a run (or a person's approval) that moved `champion`, with the night
    (`ds`) whose data made it; skips the task (no event) otherwise."""
    if "champion" not in registered.aliases or not registered.promotion.get("promoted", True):
        message = f"champion stays at version {registered.champion_before}: no new champion to publish"
        try:
            from airflow.sdk.exceptions import AirflowSkipException
        except ImportError:  # not under Airflow
            raise LeptonError(message) from None
        raise AirflowSkipException(message)
    event = pick(registered, ("model_name", "model_version", "run_id", "tracking_uri", "champion_before"))
    return {**event, "ds": night.isoformat()}


def _artifact_root(settings: Settings) -> str | None:
    """A database or local store gets an explicit artifact root; a tracking server manages its own."""
    from lepton_tasks.infra.connections import mlflow_tracking_uri

    remote = mlflow_tracking_uri(settings).startswith(("http://", "https://", "databricks"))
    return None if remote else settings.mlflow_artifact_root()


def report(ctx: RunContext) -> dict:
    """Assemble `report.json` from the stage summaries; a stage without one never ran. Where the working area's
    store does not answer (or refuses the credentials), from this host's copies, kept here, saying so."""
    try:
        return _report(ctx)
    except store.STORE_ERRORS as err:
        log.warning("%s: the report is made from this host's copies and kept here", err)
        with store.this_host_only():
            return _report(ctx, {"store_error": f"{type(err).__name__}: {err}"})


def _report(ctx: RunContext, extra: dict | None = None) -> dict:
    stages = {}
    for stage in STAGES:
        stages[stage] = read_json_if_exists(ctx.summary_path(stage)) or {"status": "not_run"}
    failed = next((s for s in STAGES if stages[s]["status"] == "failed"), None)
    status = "success" if all(s["status"] == "success" for s in stages.values()) else "failed"
    report = {
        "dag_id": ctx.dag_id, "run_id": ctx.run_id, "status": status, "failed_stage": failed,
        "spec": {"path": str(ctx.loaded.path), "sha256": ctx.loaded.sha256},
        "params": ctx.params.model_dump(), "stages": stages,
        "metrics": _metrics(stages), "mlflow": stages["register"].get("mlflow", {}),
        "promotion": stages["register"].get("mlflow", {}).get("promotion", {}), **(extra or {}),
    }
    if (decided := read_json_if_exists(ctx.paths.approval)) is not None:  # a person decided (its approval run)
        report = with_decision(report, decided)
    write_json(ctx.paths.report, report)
    log.info("report: %s (%s)", ctx.paths.report, status)
    return report


def with_decision(report: dict, registered: dict) -> dict:
    """`report` with the register manifest as a person's decision on the candidate left it (`lepton.promotion`:
    approved, rejected, timed_out or superseded; who and when)."""
    return {**report, "mlflow": registered, "promotion": registered["promotion"]}


def finish(ctx: RunContext) -> str:
    """Write the report; fail (so the DAG run fails) when a stage did not succeed. Returns the report path."""
    written = report(ctx)
    if written["status"] != "success":
        where = written["failed_stage"] or "an upstream task"
        raise _without_retry(LeptonError(f"run failed at stage '{where}'; report: {ctx.paths.report}"))
    return str(ctx.paths.report)


def _metrics(stages: dict) -> dict:
    """The headline figures of the stage summaries (each manifest names its own: `REPORT_FIGURES`)."""
    figures = {}
    for stage, manifest in MANIFESTS.items():
        for key in manifest.REPORT_FIGURES:
            if key in stages[stage]:
                figures[f"{manifest.REPORT_PREFIX}{key}"] = stages[stage][key]
    return figures


def score_date(task_context: dict[str, Any]) -> dt.date:
    """The night a scoring run scores: the one whose data made the new champion when a champion Asset event
    triggered it, else the run's own date."""
    events = [e for batch in (task_context.get("triggering_asset_events") or {}).values() for e in batch]
    nights = [e.extra["ds"] for e in events if (e.extra or {}).get("ds")]
    return parse_ds(max(nights)) if nights else run_date(task_context)


def score(loaded: LoadedSpec, task_context: dict[str, Any]) -> dict:
    """The consumer DAG `NAME_score`'s task: score the night's rows (`score.uri`, templated on the run's date)
    with the pipeline's champion (see `lepton_tasks.stages.score`), and log the scoring run to MLflow."""
    from lepton_tasks.data.windows import resolve
    from lepton_tasks.infra.connections import mlflow_auth_env, mlflow_tracking_uri
    from lepton_tasks.stages import score as stage

    spec, settings = loaded.spec, Settings.from_env()
    dag_id, run_id = task_context["dag"].dag_id, task_context["run_id"]
    os.environ.update(mlflow_auth_env())
    uris = [d.uri for d in resolve(spec.score.uri, score_date(task_context), spec.score.window_days)]
    out_dir = RunPaths.of(settings.data_root, dag_id, run_id).stage("score")
    tracking_uri = mlflow_tracking_uri(settings)
    try:
        scored = stage.score(tracking_uri, spec.registered_model_name, uris, settings.data_root, out_dir)
        manifest = replace(scored, scoring_run_id=stage.log_scoring(
            tracking_uri, spec.experiment_name, _artifact_root(settings), dag_id, run_id, scored))
    except LeptonError as err:
        if err.retryable:
            raise
        raise _without_retry(err) from err
    log.info("score summary:\n%s", summary_table(manifest.to_dict()))
    return manifest.to_dict()
