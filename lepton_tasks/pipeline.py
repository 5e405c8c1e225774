"""One function per DAG task: parse params, locate the run folder, call the stage, record a summary.

The DAG file calls these with what Airflow hands a task (dag_id, run_id, params) and the upstream manifests
from XCom; nothing here imports Airflow, so a plain script or a test drives a whole run the same way.
Each stage's summary lands in `{run}/summaries/{stage}.json` (failed ones too), and `report` assembles them
into `{run}/report.json`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lepton_tasks.config import (
    RunParams,
    Settings,
    mlflow_auth_env,
    mlflow_tracking_uri,
    parse_params,
)
from lepton_tasks.errors import LeptonError
from lepton_tasks.specs import LoadedSpec, PipelineSpec
from lepton_tasks.storage import RunPaths, read_json, write_json
from lepton_tasks.strategies import STRATEGIES
from lepton_tasks.window import DaySource, parse_ds

log = logging.getLogger(__name__)

STAGES = ("wait", "ingest", "validate", "drift", "shard", "train", "merge", "compress", "register")
VARIANT_FIGURES = ("score", "metrics", "bytes", "latency_p50_ms", "latency_p99_ms", "batch_latency_p50_ms", "verdict")
REPORT_METRICS = {"ingest": ["rows"], "validate": ["passed", "failed", "quarantined_rows"],
                  "drift": ["max_psi"], "shard": ["shard_rows", "eval_rows"],
                  "merge": ["metric", "merged_metrics", "shard_metrics"], "compress": ["chosen", "variants"]}


@dataclass(frozen=True)
class RunContext:
    """Who is running (DAG and run ids), which pipeline spec, with which params, where."""

    loaded: LoadedSpec
    dag_id: str
    run_id: str
    params: RunParams
    settings: Settings
    ds: dt.date | None = None  # the run's date (Airflow's `ds`): what a date-templated source reads

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
        return context(loaded, task_context["run_id"], dict(task_context["params"]), task_context["dag"].dag_id,
                       run_date(task_context))
    except LeptonError as err:
        raise _without_retry(err) from err


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


def _run_stage(ctx: RunContext, stage: str, body: Callable[[], Any], figures: Callable[[Any], dict]) -> dict:
    """Time `body`, write the stage summary (with its key figures, or the error), return its manifest dict."""
    started = time.perf_counter()
    try:
        manifest = body()
        result = manifest.to_dict() if hasattr(manifest, "to_dict") else manifest
    except Exception as err:
        summary = {"status": "failed", "seconds": round(time.perf_counter() - started, 3),
                   "error": f"{type(err).__name__}: {err}", **getattr(err, "figures", {})}
        if not isinstance(err, LeptonError):
            summary["traceback"] = traceback.format_exc(limit=5)
        write_json(ctx.summary_path(stage), summary)
        if isinstance(err, LeptonError) and not err.retryable:
            raise _without_retry(err) from err
        raise  # a service that is down, or a bug: Airflow's retries apply
    summary = {"status": "success", "seconds": round(time.perf_counter() - started, 3), **figures(result)}
    write_json(ctx.summary_path(stage), summary)
    log.info("%s summary:\n%s", stage, summary_table(summary))
    return result


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


def _eval_tensors(shards: dict, max_rows: int | None = None, split: str = "eval"):
    from lepton_tasks.train import load_xy

    return load_xy(shards[split]["files"], shards["encoder"], max_rows=max_rows)


CALIBRATION_ROWS = 1024


def _calibration_rows(shards: dict):
    """Encoded training rows (from the first shard) that static int8 quantization calibrates on."""
    from lepton_tasks.train import load_xy

    return load_xy(shards["shards"][0]["files"], shards["encoder"], max_rows=CALIBRATION_ROWS)[0].numpy()


def _shape(ctx: RunContext, shards: dict):
    from lepton_tasks.train import model_shape

    return model_shape(shards["encoder"], ctx.params.model_kind, ctx.params.hidden_size)


def window(ctx: RunContext) -> list[DaySource]:
    from lepton_tasks.window import resolve

    return resolve(ctx.params.source_uri, ctx.day, ctx.params.window_days)


def missing_days(ctx: RunContext) -> list[DaySource]:
    """The days of the run's window that have no data file yet."""
    from lepton_tasks.window import missing

    return missing(window(ctx), ctx.settings.data_root, ctx.spec.source.format)


def absolute(ctx: RunContext, days: list[DaySource]) -> list[DaySource]:
    from lepton_tasks.ingest import resolve_uri

    return [DaySource(d.day, resolve_uri(d.uri, ctx.settings.data_root)) for d in days]


def wait(ctx: RunContext, absent: list[DaySource]) -> dict:
    """The wait task's outcome: every day present, or a failure naming the missing ones (nothing after runs)."""
    from lepton_tasks.errors import BadSource
    from lepton_tasks.window import describe

    def body() -> dict:
        if absent:
            minutes = ctx.params.wait_timeout_minutes
            waited = f" after waiting {minutes:g} min" if minutes else ""
            raise BadSource(f"no data for {len(absent)} day(s) of the window ending {ctx.day}{waited}: "
                            f"{describe(absent)}")
        return {"ds": str(ctx.day), "days": [d.to_dict() for d in window(ctx)]}

    return _run_stage(ctx, "wait", body, lambda m: m)


def ingest(ctx: RunContext) -> dict:
    from lepton_tasks import ingest as stage

    expected = {c: "numeric" if kind == "numeric" else "any" for c, kind in ctx.spec.features.items()}
    expected[ctx.spec.target.column] = "numeric" if ctx.spec.target.task == "regression" else "any"
    return _run_stage(ctx, "ingest",
                      lambda: stage.ingest(ctx.params.source_uri, ctx.settings.data_root, ctx.stage_dir("ingest"),
                                           ctx.spec.source.format, expected, ctx.day, ctx.params.window_days),
                      lambda m: {"rows": m["rows"], "files": len(m["source_files"]), "sha256": m["sha256"],
                                 "source_sha256": m["source_sha256"], "window": m["window"]})


def start_cluster(ctx: RunContext) -> dict:
    """The run's Dask cluster (the DAG's setup task), shared by partitioned validation, shard and train. Its workers
    import GX as they start, beside ingest, when the source is big enough for validation to be partitioned."""
    from lepton_tasks.cluster import start_run_cluster

    return start_run_cluster(ctx.settings, _cluster_dir(ctx), ctx.params.num_shards,
                             validation=validation_partitioned(ctx))


def validation_partitioned(ctx: RunContext) -> bool:
    """Whether validate will likely partition this run's rows on the cluster (its own rule, on the source)."""
    return source_decoded_bytes(ctx) > ctx.settings.validate_memory_bytes


def source_decoded_bytes(ctx: RunContext) -> int:
    """About what the run's source takes decoded, before ingest has read it: Parquet files' uncompressed size from
    their footers, text files' size on disk (text is no smaller than its decoded values); 0 where the source cannot
    be listed (ingest then says why)."""
    from lepton_tasks.ingest import list_source_files, resolve_uri
    from lepton_tasks.storage import parquet_decoded_bytes

    total = 0
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
    from lepton_tasks.cluster import await_run_cluster

    return await_run_cluster(ctx.settings, _cluster_dir(ctx))


def _cluster_dir(ctx: RunContext) -> Path:
    """Where the run's cluster keeps its scheduler file and log."""
    return ctx.paths.root / "cluster"


def stop_cluster(run_cluster: dict) -> None:
    """Stop the run's Dask cluster (the DAG's teardown task, which runs whether the run failed or not)."""
    from lepton_tasks.cluster import stop_run_cluster

    stop_run_cluster(run_cluster)


def validate(ctx: RunContext, ingested: dict,
             run_cluster: dict | Callable[[], dict | None] | None = None) -> dict:
    """Validate in memory up to LEPTON_VALIDATE_MEMORY_BYTES, else partition by partition on the run's cluster
    (`run_cluster`, or a callable that starts or awaits it when needed)."""
    from lepton_tasks import validate as stage
    from lepton_tasks.cluster import EXTERNAL, dask_client, recovering, restart_without_validation
    from lepton_tasks.storage import decoded_bytes

    def body():
        run = partial(stage.validate, ingested["parts"], ctx.spec.suite_file, ctx.stage_dir("validate"),
                      ctx.params.quarantine_max_fraction)
        size = decoded_bytes(ingested["parts"])
        if size <= ctx.settings.validate_memory_bytes:
            return run()
        log.info("the stage decodes to %.1f GiB, over LEPTON_VALIDATE_MEMORY_BYTES (%.1f GiB): validating it "
                 "partition by partition on Dask", size / 2**30, ctx.settings.validate_memory_bytes / 2**30)
        cluster = run_cluster() if callable(run_cluster) else run_cluster
        with dask_client(ctx.settings, ctx.params.num_shards, cluster) as client:
            manifest = recovering(client, "validate", lambda attempt: run(client=client))
            if cluster and cluster.get("kind") != EXTERNAL:  # never another deployment's shared workers
                restart_without_validation(client)
            return manifest

    return _run_stage(ctx, "validate", body,
                      lambda m: {k: m[k] for k in ("suite", "evaluated", "passed", "failed", "docs_index",
                                                   "quarantined_rows", "quarantine_path", "partitions")})


def drift(ctx: RunContext, validated: dict, on_alarm: Callable[[str], None] = lambda message: None) -> dict:
    """Snapshot the champion, measure how far the validated rows moved from its data, write the drift report;
    over `drift_max`, call `on_alarm` with the verdict, and stop the run when `drift_action` is `fail`."""
    from lepton_tasks import champion
    from lepton_tasks import drift as stage

    def body() -> dict:
        os.environ.update(mlflow_auth_env())
        found = champion.snapshot(mlflow_tracking_uri(ctx.settings), ctx.spec.registered_model_name,
                                  ctx.paths.root / "champion")
        snap = found.champion
        reference = {"model_version": snap.version, "mlflow_run_id": snap.mlflow_run_id} if snap else None
        measured = stage.measure(validated["parts"], ctx.spec, ctx.stage_dir("drift"),
                                 Path(snap.profile) if snap and snap.profile else None, reference,
                                 ctx.params.drift_max, ctx.params.drift_action)
        if found.unusable:  # not "no champion yet": there is one, and it cannot be read
            measured.note = f"{found.note}: nothing to compare, training starts from scratch"
        verdict = stage.verdict(measured)
        log.info("%s", verdict)
        manifest = {**measured.to_dict(), "champion": snap.to_dict() if snap else None,
                    "champion_unusable": found.unusable}
        if measured.alarm:
            on_alarm(verdict)
            if measured.action == "fail":
                err = stage.DriftError(f"{verdict}: stopped before training, nothing registered")
                err.figures = _drift_figures(manifest)
                raise err
        return manifest

    return _run_stage(ctx, "drift", body, _drift_figures)


def _drift_figures(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("max_psi", "worst", "threshold", "action", "alarm", "columns", "reference",
                                     "report_path", "note", "champion_unusable")}


def warm_start(ctx: RunContext, drifted: dict) -> tuple[dict | None, str]:
    """The champion snapshot round 1 starts from, or None with the reason it starts from scratch."""
    from lepton_tasks.champion import ChampionSnapshot

    if ctx.params.init_from == "scratch":
        return None, "init_from is scratch"
    if not drifted.get("champion"):
        unusable = drifted.get("champion_unusable")
        return None, f"no usable champion ({unusable})" if unusable else "no champion yet"
    snap = ChampionSnapshot(**drifted["champion"])
    unfit = snap.unfit_reason(ctx.spec, ctx.params)
    if unfit:
        return None, unfit
    return snap.to_dict(), f"round 1 starts from champion version {snap.version} (its weights and encoder)"


def shard(ctx: RunContext, validated: dict, drifted: dict | None = None, run_cluster: dict | None = None) -> dict:
    from lepton_tasks import shard as stage
    from lepton_tasks.champion import ChampionSnapshot
    from lepton_tasks.cluster import dask_client, recovering

    def body():
        snap, reason = warm_start(ctx, drifted or {})
        log.info("warm start: %s", reason)
        encoder = ChampionSnapshot(**snap).encoder_dict() if snap else None
        with dask_client(ctx.settings, ctx.params.num_shards, run_cluster) as client:
            manifest = recovering(client, "shard", lambda attempt: stage.shard(
                validated["parts"], ctx.stage_dir("shard"), ctx.params.num_shards, ctx.params.eval_fraction,
                ctx.params.seed, ctx.spec, client, encoder, ctx.params.shard_by,
                STRATEGIES[ctx.params.merge_strategy].select_fraction))
        manifest.warm_start = {"init_from": ctx.params.init_from, "reason": reason,
                               **({"version": snap["version"], "weights": snap["weights"]} if snap else {})}
        return manifest

    return _run_stage(ctx, "shard", body, lambda m: {
        "shard_rows": {s["name"]: s["rows"] for s in m["shards"]}, "eval_rows": m["eval"]["rows"],
        "warm_start": m["warm_start"]})


def train(ctx: RunContext, shards: dict, run_cluster: dict | None = None) -> dict:
    from lepton_tasks import train as stage
    from lepton_tasks.cluster import dask_client

    def body():
        start = shards.get("warm_start") or {}
        with dask_client(ctx.settings, ctx.params.num_shards, run_cluster) as client:
            manifest = stage.train(shards["shards"], shards["encoder"], _shape(ctx, shards), ctx.params,
                                   ctx.stage_dir("train"), client, ctx.settings.train_threads,
                                   start if "weights" in start else None)
            manifest.dashboard_link = client.dashboard_link
            return manifest

    return _run_stage(ctx, "train", body, lambda m: {
        "rounds": len(m["rounds"]), "strategy": m["strategy"],
        "final_loss": {c["shard"]: c["epochs"][-1]["loss"] if c["epochs"] else None for c in m["rounds"][-1]},
        "resumed": sum(c["resumed"] for r in m["rounds"] for c in r),
        "dp_epsilon": {c["shard"]: c["epsilon"] for c in m["rounds"][-1] if c.get("epsilon") is not None} or None})


def merge(ctx: RunContext, shards: dict, trained: dict) -> dict:
    from lepton_tasks import merge as stage

    return _run_stage(ctx, "merge",
                      lambda: stage.merge(trained["rounds"], trained["merged"], _shape(ctx, shards),
                                          _eval_tensors(shards), ctx.stage_dir("merge"), ctx.spec.metric,
                                          ctx.params.local_epochs, shards["encoder"].get("classes", []),
                                          shards["shards"], ctx.params.merge_strategy,
                                          _eval_tensors(shards, split="select") if shards.get("select") else None),
                      lambda m: {"metric": m["metric"], "merged_metrics": m["merged_metrics"],
                                 "round_scores": m["round_scores"], "shard_metrics": m["shard_metrics"],
                                 "strategy": m["strategy"], "soup": m["soup"]})


def compress(ctx: RunContext, shards: dict, merged: dict) -> dict:
    from lepton_tasks import compress as stage

    return _run_stage(ctx, "compress",
                      lambda: stage.compress(Path(merged["merged_path"]), merged["merged_sha256"], _shape(ctx, shards),
                                             _eval_tensors(shards), ctx.stage_dir("compress"), ctx.spec.metric,
                                             ctx.params.compression_tolerance, ctx.params.prune_sparsity,
                                             _calibration_rows(shards)),
                      lambda m: {"chosen": m["chosen"], "variants": {
                          v["name"]: {k: v[k] for k in VARIANT_FIGURES} for v in [m["reference"], *m["variants"]]}})


def register(ctx: RunContext, manifests: dict[str, dict]) -> dict:
    from lepton_tasks import register as stage

    def body():
        os.environ.update(mlflow_auth_env())  # read by the MLflow client; never logged
        record = stage.RunRecord(ctx.dag_id, ctx.run_id, ctx.params.model_dump(), str(ctx.loaded.path),
                                 ctx.loaded.sha256, manifests["ingest"], manifests["validate"], manifests["shard"],
                                 manifests["train"], manifests["merge"], manifests["compress"],
                                 manifests.get("drift"))
        return stage.register(record, mlflow_tracking_uri(ctx.settings), ctx.spec.experiment_name,
                              ctx.spec.registered_model_name, _artifact_root(ctx.settings),
                              _eval_tensors(manifests["shard"], max_rows=stage.EXAMPLE_ROWS)[0])

    return _run_stage(ctx, "register", body, lambda m: {"mlflow": m})


def run_in_process(ctx: RunContext, last: str = "register", done: dict[str, dict] | None = None
                   ) -> tuple[dict[str, dict], dict[str, float]]:
    """Every stage up to `last`, one after another in this process, wired as the DAG wires them (one Dask cluster
    for the run, started before shard, or by validate when it partitions): the manifests and each stage's wall
    seconds (`cluster`: its start before shard or train, which the DAG's setup task pays). `done`: manifests of
    the first stages, from a run over the same data and stage params (benchmarks comparing merge strategies): the
    run goes on after them. For plain scripts, benchmarks and tests (the DAG runs each in a task)."""
    manifests, seconds, cluster = dict(done or {}), {}, {}

    def timed(name: str, step: Callable[[], dict]) -> dict:
        started = time.perf_counter()
        result = step()
        seconds[name] = time.perf_counter() - started
        return result

    def run_cluster() -> dict:
        if not cluster:
            cluster.update(start_cluster(ctx))
        return cluster

    steps: dict[str, Callable[[], dict]] = {
        "wait": lambda: wait(ctx, missing_days(ctx)),
        "ingest": lambda: ingest(ctx),
        "validate": lambda: validate(ctx, manifests["ingest"], run_cluster),
        "drift": lambda: drift(ctx, manifests["validate"]),
        "shard": lambda: shard(ctx, manifests["validate"], manifests["drift"], run_cluster()),
        "train": lambda: train(ctx, manifests["shard"], run_cluster()),
        "merge": lambda: merge(ctx, manifests["shard"], manifests["train"]),
        "compress": lambda: compress(ctx, manifests["shard"], manifests["merge"]),
        "register": lambda: register(ctx, manifests),
    }
    try:
        for stage in [s for s in STAGES[:STAGES.index(last) + 1] if s not in manifests]:
            if stage in ("shard", "train") and not cluster:
                timed("cluster", run_cluster)  # apart from the stage, as the DAG's setup task
            manifests[stage] = timed(stage, steps[stage])
    finally:
        if cluster:
            stop_cluster(cluster)
    return manifests, seconds


def validated_event(validated: dict) -> dict:
    """What the validated-data Asset event carries: where the rows are and how they fared."""
    return {k: validated.get(k) for k in ("suite", "rows", "passed", "failed", "quarantined_rows", "parts")}


def champion_event(ctx: RunContext, registered: dict) -> dict:
    """The champion-model Asset event for a run that moved `champion` (with the night, `ds`, whose data made it);
    skips the task (no event) otherwise."""
    if "champion" not in registered.get("aliases", []) or not registered.get("promotion", {}).get("promoted", True):
        message = f"champion stays at version {registered.get('champion_before')}: no new champion to publish"
        try:
            from airflow.sdk.exceptions import AirflowSkipException
        except ImportError:  # not under Airflow
            raise LeptonError(message) from None
        raise AirflowSkipException(message)
    event = {k: registered[k] for k in ("model_name", "model_version", "run_id", "tracking_uri", "champion_before")}
    return {**event, "ds": ctx.day.isoformat()}


def _artifact_root(settings: Settings) -> str | None:
    """A database or local store gets an explicit artifact root; a tracking server manages its own."""
    remote = mlflow_tracking_uri(settings).startswith(("http://", "https://", "databricks"))
    return None if remote else settings.mlflow_artifact_root()


def report(ctx: RunContext) -> dict:
    """Assemble `report.json` from the stage summaries; a stage without one never ran."""
    stages = {}
    for stage in STAGES:
        path = ctx.summary_path(stage)
        stages[stage] = read_json(path) if path.exists() else {"status": "not_run"}
    failed = next((s for s in STAGES if stages[s]["status"] == "failed"), None)
    status = "success" if all(s["status"] == "success" for s in stages.values()) else "failed"
    report = {
        "dag_id": ctx.dag_id, "run_id": ctx.run_id, "status": status, "failed_stage": failed,
        "spec": {"path": str(ctx.loaded.path), "sha256": ctx.loaded.sha256},
        "params": ctx.params.model_dump(), "stages": stages,
        "metrics": _metrics(stages), "mlflow": stages["register"].get("mlflow", {}),
    }
    write_json(ctx.paths.report, report)
    log.info("report: %s (%s)", ctx.paths.report, status)
    return report


def finish(ctx: RunContext) -> str:
    """Write the report; fail (so the DAG run fails) when a stage did not succeed. Returns the report path."""
    written = report(ctx)
    if written["status"] != "success":
        where = written["failed_stage"] or "an upstream task"
        raise _without_retry(LeptonError(f"run failed at stage '{where}'; report: {ctx.paths.report}"))
    return str(ctx.paths.report)


def _metrics(stages: dict) -> dict:
    figures = {}
    for stage, keys in REPORT_METRICS.items():
        for key in keys:
            if key in stages[stage]:
                figures[f"{stage}.{key}" if stage in ("validate", "drift") else key] = stages[stage][key]
    return figures


def score_date(task_context: dict[str, Any]) -> dt.date:
    """The night a scoring run scores: the one whose data made the new champion when a champion Asset event
    triggered it, else the run's own date."""
    events = [e for batch in (task_context.get("triggering_asset_events") or {}).values() for e in batch]
    nights = [e.extra["ds"] for e in events if (e.extra or {}).get("ds")]
    return parse_ds(max(nights)) if nights else run_date(task_context)


def score(loaded: LoadedSpec, task_context: dict[str, Any]) -> dict:
    """The consumer DAG `NAME_score`'s task: score the night's rows (`score.uri`, templated on the run's date)
    with the pipeline's champion (see `lepton_tasks.score`), and log the scoring run to MLflow."""
    from lepton_tasks import score as stage
    from lepton_tasks.window import resolve

    spec, settings = loaded.spec, Settings.from_env()
    dag_id, run_id = task_context["dag"].dag_id, task_context["run_id"]
    os.environ.update(mlflow_auth_env())
    uris = [d.uri for d in resolve(spec.score.uri, score_date(task_context), spec.score.window_days)]
    out_dir = RunPaths.of(settings.data_root, dag_id, run_id).stage("score")
    tracking_uri = mlflow_tracking_uri(settings)
    try:
        manifest = stage.score(tracking_uri, spec.registered_model_name, uris, settings.data_root, out_dir)
        manifest.scoring_run_id = stage.log_scoring(tracking_uri, spec.experiment_name, _artifact_root(settings),
                                                   dag_id, run_id, manifest)
    except LeptonError as err:
        if err.retryable:
            raise
        raise _without_retry(err) from err
    log.info("score summary:\n%s", summary_table(manifest.to_dict()))
    return manifest.to_dict()
