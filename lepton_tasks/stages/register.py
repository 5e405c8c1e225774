"""Register: log the run's artifacts and metrics in MLflow and register the merged model.

Idempotent by design: the parent run is found by its DAG-run tags and its merged model's checksum before one is
created, shard runs by their shard tag under it, and the model version by its run, so a retried task completes
the same run and version instead of making new ones. A registration, once complete, is never written again: a
rerun of the same DAG run with the same model changes nothing, and one whose model differs (the night rerun on
changed data) makes a new MLflow run and a new version, which goes through the gate like any other.

A version carries its own files (`extra_files`: weights, encoder, chosen ONNX model, drift profile), which the
gate, drift, the warm start and scoring read through `models:/NAME/VERSION`; the run's artifacts are for people.

Order matters for safety: everything is logged first, the version registered second, aliases moved last;
`champion` moves only when the new version's held-out metric is at least as good as the current champion's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lepton_tasks.config.settings import redact_uri
from lepton_tasks.core.errors import RegistryError
from lepton_tasks.data.manifests import (
    CompressManifest,
    DriftManifest,
    IngestManifest,
    MergeManifest,
    RegisterManifest,
    ShardManifest,
    TrainManifest,
    ValidationManifest,
    own_model_params,
)
from lepton_tasks.infra.tracking import (
    TAG_CHAMPION_UNUSABLE,
    TAG_COMPLETE,
    TAG_DAG,
    TAG_DATA_SHA,
    TAG_INIT,
    TAG_INIT_FALLBACK,
    TAG_METRIC,
    TAG_MODEL_SHA,
    TAG_RUN,
    TAG_SCORE,
    TAG_SHARD,
    TAG_SOURCE,
    TAG_SPEC,
    TAG_SPEC_SHA,
    TAG_SUPERSEDES,
    TAG_WINDOW,
    ensure_experiment,
    find_or_create_run,
    find_run,
    limit_retries,
    log_metrics,
    open_run,
)
from lepton_tasks.ml import champion as champions
from lepton_tasks.ml.champion import CHAMPION, current_champion
from lepton_tasks.ml.metrics import at_least_as_good
from lepton_tasks.ml.models import load_checkpoint, load_model
from lepton_tasks.ml.strategies import STRATEGIES

log = logging.getLogger(__name__)

CANDIDATE = "candidate"


@dataclass
class RunRecord:
    """Everything the earlier stages produced: their manifests, and who ran them with which params."""

    dag_id: str
    run_id: str
    params: dict
    spec_path: str
    spec_sha256: str
    ingest: IngestManifest
    validation: ValidationManifest
    shards: ShardManifest
    train: TrainManifest
    merge: MergeManifest
    compress: CompressManifest
    drift: DriftManifest | None = None


def _lineage(record: RunRecord) -> dict[str, str]:
    """Which spec, which data (and which days of it) and which starting weights made this model."""
    days = [d["day"] for d in record.ingest.window if d.get("day")]
    start = record.shards.warm_start
    started_from = start.version if start else None
    tags = {TAG_SPEC: Path(record.spec_path).stem, TAG_SPEC_SHA: record.spec_sha256,
            TAG_SOURCE: record.ingest.source_uri, TAG_DATA_SHA: record.ingest.source_sha256,
            TAG_INIT: f"champion:{started_from}" if started_from else "scratch"}
    if days:
        tags[TAG_WINDOW] = f"{days[0]}..{days[-1]}"
    if start and start.init_from == "champion" and not started_from:
        tags[TAG_INIT_FALLBACK] = start.reason[:5000]
    if record.drift and record.drift.champion_unusable:
        tags[TAG_CHAMPION_UNUSABLE] = record.drift.champion_unusable[:5000]
    return tags


def summary_metrics(record: RunRecord) -> dict[str, float]:
    """The parent run's headline figures."""
    metrics = {
        "rows_ingested": record.ingest.rows,
        "expectations_passed": record.validation.passed,
        "expectations_failed": record.validation.failed,
        "rows_quarantined": record.validation.quarantined_rows,
        "eval_rows": record.merge.eval_rows,
        **{f"eval_{name}": value for name, value in record.merge.merged_metrics.items()},
    }
    spent = [c["epsilon"] for c in record.train.rounds[-1] if c.get("epsilon") is not None]
    if spent:
        metrics["dp_epsilon_max"] = max(spent)  # the weakest privacy any shard got
    for variant in [record.compress.reference, *record.compress.variants]:
        metrics.update({f"{variant.name}_{name}": value for name, value in variant.metrics.items()})
        for key in ("bytes", "latency_p50_ms", "latency_p99_ms", "batch_latency_p50_ms"):
            metrics[f"{variant.name}_{key}"] = getattr(variant, key)
    return metrics


def _log_shard_runs(client, experiment_id: str, parent: str, record: RunRecord) -> None:
    """One nested run per shard: per-epoch curves over all rounds, size, label mix and held-out metrics."""
    epochs_per_round = record.params["local_epochs"]
    by_shard = {s.name: s for s in record.shards.shards}
    for rnd in record.train.rounds:
        for ckpt in rnd:
            shard = ckpt["shard"]
            tags = {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_SHARD: shard}
            run_id = open_run(client, experiment_id, tags, shard, parent)
            for epoch in ckpt["epochs"]:
                step = (ckpt["round"] - 1) * epochs_per_round + epoch["epoch"]
                log_metrics(client, run_id, {"loss": epoch["loss"]}, step)
    spent = {c["shard"]: c["epsilon"] for c in record.train.rounds[-1] if c.get("epsilon") is not None}
    for shard, info in by_shard.items():
        run_id = find_run(client, experiment_id, {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_SHARD: shard,
                                                   "mlflow.parentRunId": parent})
        client.log_param(run_id, "rows", info.rows)
        if info.keys:
            client.log_param(run_id, "shard_by_values", ",".join(info.keys)[:6000])  # MLflow's param limit
        client.log_dict(run_id, info.label_histogram, "label_histogram.json")
        log_metrics(client, run_id, {f"eval_{k}": v for k, v in record.merge.shard_metrics[shard].items()})
        if shard in spent:
            log_metrics(client, run_id, {"dp_epsilon": spent[shard]})
        client.set_terminated(run_id, "FINISHED")


def _log_artifacts(client, run_id: str, record: RunRecord) -> None:

    client.log_artifact(run_id, record.validation.result_path, "validation")
    client.log_artifacts(run_id, str(Path(record.validation.docs_index).parent), "validation/docs")
    if record.validation.quarantine_path:  # the rows held back, with their reasons (not the clean data)
        client.log_artifacts(run_id, record.validation.quarantine_path, "validation/quarantine")
    client.log_dict(run_id, record.shards.to_dict(), "shards/manifest.json")
    client.log_dict(run_id, record.shards.encoder, "model/encoder.json")  # how to turn rows into model input
    client.log_artifact(run_id, record.spec_path, "spec")
    client.log_dict(run_id, record.ingest.to_dict(), "ingest/manifest.json")
    client.log_dict(run_id, record.ingest.window, "lineage/source_files.json")  # each file's sha256
    if record.drift:  # this run's data profile: the reference drift is measured against once it is champion
        client.log_artifact(run_id, record.drift.profile_path, "drift")
        if record.drift.report_path:
            client.log_artifact(run_id, record.drift.report_path, "drift")
    client.log_artifacts(run_id, record.train.stage_dir, "checkpoints")
    client.log_artifact(run_id, record.merge.merged_path, "merged")
    client.log_artifact(run_id, record.compress.chosen_path, "onnx")
    client.log_dict(run_id, record.compress.to_dict(), "onnx/variants.json")
    client.log_table(run_id, record.compress.tradeoff_table(), "onnx/tradeoff.json")  # why each variant, or not
    for plot in [*record.merge.plots, *record.compress.plots]:
        client.log_artifact(run_id, plot, "plots")


def _log_dataset(run_id: str, record: RunRecord) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = record.ingest.source_uri
    source = _sql_dataset_source(record.ingest) if uri.startswith("sql://") else resolve_dataset_source(uri)
    staged = MetaDataset(source, name="ingested", digest=record.ingest.sha256[:36])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(staged, context="training")


def _sql_dataset_source(ingested: IngestManifest):
    """A SQL source as MLflow's dataset source: the connection and table (`sql://CONN_ID/TABLE`), the statement and
    the values it was run with (never a login)."""
    from mlflow.data.dataset_source import DatasetSource

    class SqlDatasetSource(DatasetSource):
        def __init__(self, uri: str, statement: str, values: dict):
            self.uri, self.statement, self.values = uri, statement, values

        @staticmethod
        def _get_source_type() -> str:
            return "sql"

        def load(self):
            raise NotImplementedError("re-read it with its Airflow connection: lepton_tasks.data.warehouse")

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source):
            raise NotImplementedError

        def to_dict(self) -> dict:
            return {"uri": self.uri, "statement": self.statement, "values": self.values}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(**source_dict)

    read = ingested.window[0]
    return SqlDatasetSource(ingested.source_uri, read["statement"], read["values"])


EXAMPLE_ROWS = 2  # the model's input example: pt2 export needs a batch of at least 2


def _version_files(record: RunRecord, folder: Path) -> list[str]:
    """The files a version carries for the gate, drift, the warm start and scoring (champion.WEIGHTS, ...)."""
    import shutil

    (folder / champions.ENCODER).write_text(json.dumps(record.shards.encoder))
    (folder / champions.VARIANTS).write_text(json.dumps(record.compress.to_dict()))
    copied = {champions.WEIGHTS: record.merge.merged_path,
              Path(record.compress.chosen_path).name: record.compress.chosen_path}
    if record.drift:
        copied[champions.PROFILE] = record.drift.profile_path
    for name, source in copied.items():
        shutil.copyfile(source, folder / name)
    return [str(folder / name) for name in (champions.ENCODER, champions.VARIANTS, *copied)]


def _log_model(run_id: str, record: RunRecord, example_features) -> str:
    """Log the merged model (pt2, with signature and a 2-row input example) and its files; returns its model
    URI."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import infer_signature

    shape = record.train.shape
    model = load_model(shape, load_checkpoint(Path(record.merge.merged_path), record.merge.merged_sha256)[0])
    example = example_features[:EXAMPLE_ROWS].numpy()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="lepton-version-") as tmp:
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example,
                                        serialization_format="pt2", extra_files=_version_files(record, Path(tmp)),
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def _existing_version(client, model_name: str, record: RunRecord, run_id: str):
    """The version this MLflow run registered, if it did."""
    query = f"name = '{model_name}' and tags.`{TAG_RUN}` = '{record.run_id}'"
    versions = [v for v in client.search_model_versions(query)
                if v.tags.get(TAG_DAG) == record.dag_id and v.run_id == run_id]
    return versions[0] if versions else None


def _register_version(client, model_name: str, model_uri: str, run_id: str, record: RunRecord):
    import mlflow

    metric = record.merge.metric
    score = record.merge.merged_metrics[metric]
    tags = {TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_METRIC: metric, TAG_SCORE: repr(score),
            **_lineage(record)}
    version = mlflow.register_model(model_uri, model_name, tags=tags)
    client.update_model_version(
        model_name, version.version,
        description=(f"{STRATEGIES[record.merge.strategy].title} of {len(record.shards.shards)} "
                     f"shards over {record.merge.rounds} round(s)"
                     + (f" (soup of {', '.join(record.merge.soup)})" if record.merge.soup else "") + "; "
                     f"held-out {metric} {score:.4f} on {record.merge.eval_rows} rows. "
                     f"Spec {Path(record.spec_path).name} (sha256 {record.spec_sha256[:12]}), data "
                     f"{record.ingest.source_uri} (sha256 {record.ingest.source_sha256[:12]}). "
                     f"DAG {record.dag_id}, run {record.run_id}, MLflow run {run_id}."),
    )
    return version


def _champion_on_this_data(client, champion, record: RunRecord, metric: str) -> tuple[float | None, str | None]:
    """The champion re-scored on this run's held-out rows, with its version's own encoder and weights
    (safetensors: no pickle), or (None, why) when its files are gone or its columns no longer fit the data. A
    registry that cannot be reached raises (retryable): that decides nothing."""
    import tempfile

    from lepton_tasks.ml.models import evaluate
    from lepton_tasks.ml.tensors import load_xy, version_shape

    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights, encoder_file, params = champions.version_model(client, champion, Path(tmp))
            encoder = json.loads(encoder_file.read_text())
            shape = version_shape(encoder, params)
            model = load_model(shape, load_checkpoint(weights)[0])
            features, targets = load_xy(record.shards.eval.files, encoder)
            return evaluate(model, shape, features, targets)[metric], None
    except Exception as err:  # files gone, or another schema: no comparison, so no promotion
        if champions.is_unreachable(err):
            raise
        log.warning("could not re-score champion version %s on this run's held-out rows: %s", champion.version, err)
        return None, f"{type(err).__name__}: {err}"


PROMOTED, KEPT, NOT_COMPARED = "promoted", "kept_champion", "not_compared"  # tag lepton.promotion
REPLACED = "replaced_unusable"  # a person asked (replace_unusable_champion) to replace a champion that can't be scored


def _compare(client, champion, version, record: RunRecord) -> dict:
    """Whether this version may take `champion`: only when it is the first, or when it scores at least as well
    as the champion re-scored on this run's held-out rows. No comparison on the same rows, no promotion."""
    metric = record.merge.metric
    score = record.merge.merged_metrics[metric]
    comparison = {"metric": metric, "candidate_version": str(version.version), "candidate_score": score,
                  "eval_rows": record.merge.eval_rows, "eval_sha256": record.shards.eval.sha256,
                  "champion_version": str(champion.version) if champion else None}
    if champion is None:
        return {**comparison, "outcome": PROMOTED, "reason": "no champion yet: the first one of this model"}
    if str(champion.version) == str(version.version):
        return {**comparison, "outcome": PROMOTED, "reason": "already champion (a retry of this registration)"}
    same_data, why_not = _champion_on_this_data(client, champion, record, metric)
    comparison["champion_score_same_data"] = same_data
    if same_data is None and record.params.get("replace_unusable_champion"):
        return {**comparison, "outcome": REPLACED,
                "reason": f"champion version {champion.version} could not be re-scored on this run's held-out rows "
                          f"({why_not}); replaced as param 'replace_unusable_champion' asks"}
    if same_data is None:
        return {**comparison, "outcome": NOT_COMPARED,
                "reason": f"champion version {champion.version} could not be re-scored on this run's held-out rows "
                          f"({why_not}): not promoted without a comparison on the same rows"}
    better = at_least_as_good(metric, score, same_data)
    return {**comparison, "outcome": PROMOTED if better else KEPT,
            "reason": f"{metric} {score:.4f} vs champion {same_data:.4f} on this run's held-out rows"}


ALIAS_TRIES = 3


def _alias_taken(err: Exception) -> bool:
    """MLflow's SQL store sets an alias as delete-then-insert: two runs of one model setting the same alias at the
    same moment, one insert fails on the alias table's unique key (SQLite's or PostgreSQL's wording)."""
    said = str(err)
    return "registered_model_aliases" in said and ("UNIQUE" in said or "duplicate key" in said)


def _set_alias(client, model_name: str, alias: str, version) -> bool:
    """Point `alias` at `version`; False where a concurrent run's set of the same alias got in between."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(model_name, alias, version)
        return True
    except MlflowException as err:
        if not _alias_taken(err):
            raise
        log.warning("another run set alias '%s' of %s at the same moment", alias, model_name)
        return False


def _alias_contended(alias: str, model_name: str) -> RegistryError:
    return RegistryError(f"alias '{alias}' of {model_name} was set by another run at the same moment, "
                         f"{ALIAS_TRIES} times in a row: not moved (Airflow's retry tries again)")


def _move_aliases(client, model_name: str, version, record: RunRecord, run_id: str,
                  approval_required: bool = False) -> tuple[list[str], dict]:
    """`candidate` always; `champion` only as `_compare` decides, or, where the spec requires approval, not here:
    a candidate that passed the gate is `awaiting_approval` (see `decide`). The comparison is recorded in the run
    (tag `lepton.promotion`, metric, promotion.json) and returned for the report. Where a concurrent run of the
    same model set an alias at the same moment, it is set again; `champion` after comparing with that run's
    model."""
    if not any(_set_alias(client, model_name, CANDIDATE, version.version) for _ in range(ALIAS_TRIES)):
        raise _alias_contended(CANDIDATE, model_name)
    for _ in range(ALIAS_TRIES):
        comparison = _compare(client, current_champion(client, model_name), version, record)
        comparison["promoted"] = comparison["outcome"] in (PROMOTED, REPLACED)
        if approval_required and comparison["promoted"] and comparison["champion_version"] != str(version.version):
            comparison.update(outcome=AWAITING, promoted=False, gate=comparison["outcome"],
                              reason=f"{comparison['reason']}; passed the gate, waiting for a person's approval")
        if comparison.get("champion_score_same_data") is not None:
            log_metrics(client, run_id,
                        {f"champion_eval_{comparison['metric']}": comparison["champion_score_same_data"]})
        client.log_dict(run_id, comparison, "promotion.json")
        client.set_tag(run_id, "lepton.promotion", comparison["outcome"])
        if not comparison["promoted"] or _set_alias(client, model_name, CHAMPION, version.version):
            break
    else:
        raise _alias_contended(CHAMPION, model_name)
    log.info("champion %s version %s (was %s): %s", "->" if comparison["promoted"] else "stays, not",
             version.version, comparison["champion_version"], comparison["reason"])
    aliases = client.get_model_version(model_name, version.version).aliases
    return sorted(aliases), comparison


AWAITING = "awaiting_approval"  # passed the gate; `champion` moves when a person approves (spec promotion.approval)
APPROVED, REJECTED, TIMED_OUT, SUPERSEDED = "approved", "rejected", "timed_out", "superseded"  # a person's decision


def decide(tracking_uri: str, registered: RegisterManifest, approved: bool, decided_by: str | None,
           decided_at: str) -> RegisterManifest:
    """A person's decision on a candidate `awaiting_approval`: approved, `champion` moves to it unless it moved
    since the candidate was compared (superseded: the comparison no longer holds); rejected, or no decision before
    the timeout (`decided_by` None), it stays. Recorded as tags `lepton.promotion` (and `.decided_by`, `.decided_at`)
    on the MLflow run and the model version, and approval.json in the run; returns the manifest as it now is."""
    limit_retries()
    from mlflow import MlflowClient

    client, model = MlflowClient(tracking_uri), registered.model_name
    try:
        champion = current_champion(client, model)
        now = str(champion.version) if champion else None
        if decided_by is None:
            outcome, reason = TIMED_OUT, "no decision before the timeout: rejected by default"
        elif not approved:
            outcome, reason = REJECTED, f"rejected by {decided_by}"
        elif now not in (registered.champion_before, registered.model_version):
            outcome, reason = SUPERSEDED, (f"approved by {decided_by}, but champion moved to version {now} since this "
                                           f"candidate was compared with version {registered.champion_before}")
        else:
            outcome, reason = APPROVED, f"approved by {decided_by}"
            if not any(_set_alias(client, model, CHAMPION, registered.model_version) for _ in range(ALIAS_TRIES)):
                raise _alias_contended(CHAMPION, model)
        decision = {"outcome": outcome, "decided_by": decided_by, "decided_at": decided_at, "reason": reason}
        for key, value in {"lepton.promotion": outcome, "lepton.promotion.decided_by": decided_by or "(timeout)",
                           "lepton.promotion.decided_at": decided_at}.items():
            client.set_tag(registered.run_id, key, value)
            client.set_model_version_tag(model, registered.model_version, key, value)
        client.log_dict(registered.run_id, decision, "approval.json")
        aliases = sorted(client.get_model_version(model, registered.model_version).aliases)
    except RegistryError:
        raise
    except Exception as err:
        raise RegistryError(f"recording the decision on {model} version {registered.model_version} in MLflow at "
                            f"{redact_uri(tracking_uri)} failed: {type(err).__name__}: {err}") from err
    log.info("%s version %s: %s", model, registered.model_version, reason)
    promotion = {**registered.promotion, "outcome": outcome, "promoted": outcome == APPROVED, "approval": decision}
    return replace(registered, aliases=aliases, promotion=promotion)


RERUN = "rerun"  # outcome of a DAG run registered before with the same model: nothing is logged, compared or moved


def _aliases_as_they_are(client, model_name: str, version) -> tuple[list[str], dict]:
    """A DAG run that completed its registration of the same model before and runs again (a rerun night) writes
    nothing and moves no alias: its decision was made (promotion.json and tag `lepton.promotion` of its MLflow run
    keep it), and moving `champion` now could take it back from a newer night."""
    champion = current_champion(client, model_name)
    promotion = {"outcome": RERUN, "promoted": False, "candidate_version": str(version.version),
                 "champion_version": str(champion.version) if champion else None,
                 "reason": f"this DAG run registered version {version.version} before; a rerun moves no alias"}
    return sorted(client.get_model_version(model_name, version.version).aliases), promotion


def _reopen(client, run_id: str, created: bool) -> None:
    """A run found RUNNING belongs to an attempt that was killed: close it as FAILED (and count it) before this
    attempt logs everything again; it is complete only when `lepton.complete` is set at the very end."""
    run = client.get_run(run_id)
    if not created and run.info.status == "RUNNING":
        interrupted = int(run.data.tags.get("lepton.interrupted_attempts", "0")) + 1
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "lepton.interrupted_attempts", str(interrupted))
        log.warning("MLflow run %s was left RUNNING by a killed attempt: marked FAILED, logging it again", run_id)
    client.set_tag(run_id, TAG_COMPLETE, "false")
    client.update_run(run_id, status="RUNNING")


def register(record: RunRecord, tracking_uri: str, experiment_name: str, model_name: str,
             artifact_root: str | None, example_features, approval_required: bool = False) -> RegisterManifest:
    """Log the whole run to MLflow (idempotently) and register its merged model (`champion` moved here only where
    no approval is required).

    Any MLflow failure (a server down, a refused write) becomes a RegistryError, which Airflow retries; the run
    is marked FAILED where the server still answers, and aliases are only ever moved as the last step.
    """
    limit_retries()
    import mlflow
    from mlflow import MlflowClient

    where = redact_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        experiment_id = ensure_experiment(client, experiment_name, artifact_root)
        run_id, created = find_or_create_run(client, experiment_id, {
            TAG_RUN: record.run_id, TAG_DAG: record.dag_id, TAG_MODEL_SHA: record.merge.merged_sha256},
            record.run_id)
        registered = None if created else _completed_version(client, run_id, model_name, record)
        if registered is not None:  # the same DAG run and model again (a rerun night): nothing is written
            aliases, promotion = _aliases_as_they_are(client, model_name, registered)
            return RegisterManifest(where, experiment_id, run_id, model_name, str(registered.version), aliases,
                                    promotion["champion_version"], promotion)
        if created:
            _note_superseded(client, experiment_id, run_id, record)
        _reopen(client, run_id, created)
    except Exception as err:
        raise RegistryError(f"MLflow at {where} cannot be reached or refused the run: {type(err).__name__}: "
                            f"{err}") from err
    try:
        version = _log_and_register(client, experiment_id, run_id, record, model_name, example_features)
        aliases, promotion = _move_aliases(client, model_name, version, record, run_id, approval_required)
        client.set_tag(run_id, TAG_COMPLETE, "true")
        client.set_terminated(run_id, "FINISHED")
    except Exception as err:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # the server is gone: the retry finds the run RUNNING and closes it
            pass
        raise RegistryError(f"registering in MLflow at {where} failed (run {run_id}): {type(err).__name__}: "
                            f"{err}") from err
    return RegisterManifest(where, experiment_id, run_id, model_name, str(version.version), aliases,
                            promotion["champion_version"], promotion)


def _completed_version(client, run_id: str, model_name: str, record: RunRecord):
    """The version a complete registration of this run made, or None while it is not complete."""
    if client.get_run(run_id).data.tags.get(TAG_COMPLETE) != "true":
        return None
    return _existing_version(client, model_name, record, run_id)


def _note_superseded(client, experiment_id: str, run_id: str, record: RunRecord) -> None:
    """Where this DAG run was registered before from another model (rerun on changed data), say so: the earlier
    MLflow runs and their versions stay exactly as they were, and this model is gated as a new version."""
    query = (f"tags.`{TAG_RUN}` = '{record.run_id}' and tags.`{TAG_DAG}` = '{record.dag_id}' and "
             "tags.`mlflow.parentRunId` IS NULL")
    earlier = [r.info.run_id for r in client.search_runs([experiment_id], query) if r.info.run_id != run_id]
    if earlier:
        client.set_tag(run_id, TAG_SUPERSEDES, ",".join(earlier))
        log.warning("DAG run %s was registered before from another model (MLflow run(s) %s): this model is "
                    "registered as a new version and gated; the earlier run(s) and version(s) are left as they "
                    "were", record.run_id, ", ".join(earlier))


def _log_and_register(client, experiment_id: str, run_id: str, record: RunRecord, model_name: str, example_features):
    """Everything about the run, then the model version (found again by its DAG-run tag on a retry)."""
    for key, value in _lineage(record).items():
        client.set_tag(run_id, key, value)
    shape = record.train.shape
    for key, value in {**record.params, **own_model_params(shape.kind, shape.kwargs)}.items():
        client.log_param(run_id, key, value)
    log_metrics(client, run_id, summary_metrics(record))
    if record.drift and record.drift.max_psi is not None:
        log_metrics(client, run_id, {"drift_max_psi": record.drift.max_psi,
                                      **{f"drift_psi.{c}": v for c, v in record.drift.columns.items()}})
    metric = record.merge.metric
    for rnd, score in enumerate(record.merge.round_scores, start=1):  # the merged curve, per round
        log_metrics(client, run_id, {f"merged_eval_{metric}_by_round": score}, step=rnd)
    _log_shard_runs(client, experiment_id, run_id, record)
    _log_artifacts(client, run_id, record)
    _log_dataset(run_id, record)
    version = _existing_version(client, model_name, record, run_id)
    if version is None:
        version = _register_version(client, model_name, _log_model(run_id, record, example_features), run_id, record)
    return version
