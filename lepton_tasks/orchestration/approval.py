"""A person at the promotion gate (spec `promotion: {approval: required, timeout_hours: H}`).

A run whose candidate passes the automatic gate registers it without moving `champion` (outcome
`awaiting_approval`) and, in its task `request_approval`, starts a run of the DAG `NAME_approval` for it, with the
evidence as that run's conf. The run itself then finishes: the next night never waits on this one's decision
(a backfill of seven nights asks seven questions at once). The approval run waits in Airflow's human-in-the-loop
`HITLOperator` (the Required Actions page, or its REST API) for Approve or Reject, `timeout_hours` at most (a
timeout rejects); `decide` then moves `champion` on approval (unless it moved since: superseded), tags the decision
in MLflow, and writes it into the night's run folder (`approval.json`, read into `report.json`).
"""

from __future__ import annotations

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

from lepton_tasks.config.settings import Settings
from lepton_tasks.config.specs import LoadedSpec
from lepton_tasks.core.storage import RunPaths, read_json_if_exists, write_json
from lepton_tasks.data.manifests import RegisterManifest
from lepton_tasks.orchestration import pipeline
from lepton_tasks.orchestration import result_links as links

APPROVE, REJECT = "Approve", "Reject"


def request(ctx: pipeline.RunContext, registered: RegisterManifest) -> dict:
    """The approval run's conf: which night and version, and the evidence a person decides on (markdown)."""
    model = f"{registered.model_name} version {registered.model_version}"
    return {"dag_id": ctx.dag_id, "run_id": ctx.run_id, "ds": ctx.day.isoformat(),
            "registered": registered.to_dict(), "subject": f"Promote {model} to champion? (night {ctx.day})",
            "body": evidence(ctx, registered)}


def evidence(ctx: pipeline.RunContext, registered: RegisterManifest) -> str:
    """Candidate against champion on the same held-out rows, the drift verdict, the validation summary, the
    compression trade-off, and links to the MLflow version, the data docs and the drift report (markdown)."""
    summaries = {stage: found for stage in ("validate", "drift", "compress")
                 if (found := read_json_if_exists(ctx.summary_path(stage))) is not None}
    metric = registered.promotion.get("metric", ctx.spec.metric)
    champion = registered.promotion.get("champion_version")
    as_dict = registered.to_dict()
    return "\n".join([
        f"### {registered.model_name} version {registered.model_version}: night {ctx.day}", "",
        *_gate(registered, metric), "",
        f"**Drift**: {_drift(summaries.get('drift', {}))}", "",
        f"**Validation**: {_validation(summaries.get('validate', {}))}", "",
        *_compression(summaries.get("compress", {}), metric), "",
        f"[MLflow model version]({links.model_version_url(as_dict)}) · [MLflow run]({links.mlflow_run_url(as_dict)})"
        f" · [Data docs]({links.data_docs_url(ctx.dag_id, ctx.run_id)}) · "
        f"[Drift report]({links.drift_report_url(ctx.dag_id, ctx.run_id)})", "",
        f"Approve moves `champion` to version {registered.model_version}; Reject, or no answer in "
        f"{ctx.spec.promotion.timeout_hours:g} h, leaves it at {champion or 'none'}."])


def _gate(registered: RegisterManifest, metric: str) -> list[str]:
    gate, champion = registered.promotion, registered.promotion.get("champion_version")
    return [f"**Automatic gate**: {gate.get('reason', '')}", "",
            f"| model | {metric} on the same {gate.get('eval_rows', '?')} held-out rows |", "|---|---|",
            f"| candidate, version {registered.model_version} | {_number(gate.get('candidate_score'))} |",
            f"| champion, version {champion} | {_number(gate.get('champion_score_same_data'))} |" if champion
            else "| champion | none yet: this would be the first |"]


def _drift(drift: dict) -> str:
    if drift.get("max_psi") is None:
        return "no champion data to compare with"
    over = "**over: drift alarm**" if drift.get("alarm") else "under"
    return f"worst PSI {drift['max_psi']:.3f} ({drift.get('worst')}), threshold {drift.get('threshold')}: {over}"


def _validation(validated: dict) -> str:
    return (f"suite `{validated.get('suite')}`, {validated.get('passed')} of {validated.get('evaluated')} "
            f"expectations passed, {validated.get('quarantined_rows', 0)} rows quarantined")


def _compression(compressed: dict, metric: str) -> list[str]:
    lines = [f"**Compression** (chosen: `{compressed.get('chosen')}`)", "",
             f"| variant | {metric} | bytes | p50 ms | verdict |", "|---|---|---|---|---|"]
    for name, variant in compressed.get("variants", {}).items():
        lines.append(f"| {name} | {_number(variant.get('score'))} | {variant.get('bytes')} | "
                     f"{_number(variant.get('latency_p50_ms'))} | {variant.get('verdict', '')} |")
    return lines


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


class RequestApproval(TriggerDagRunOperator):
    """Start the approval run of a candidate `awaiting_approval` (one per night: a retry, or a rerun of the night,
    finds it there); skipped where the run moved no candidate to the gate."""

    def __init__(self, loaded: LoadedSpec, **kwargs):
        super().__init__(trigger_dag_id=loaded.spec.approval_dag_id, wait_for_completion=False,
                         skip_when_already_exists=True, doc_md="Start the run of NAME_approval where a person "
                         "decides on this night's candidate; skipped when no candidate passed the gate.", **kwargs)
        self.loaded = loaded

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowSkipException

        from lepton_tasks.stages.register import AWAITING

        ctx = pipeline.from_airflow(context, self.loaded)
        registered = RegisterManifest.from_dict(context["ti"].xcom_pull(task_ids="register"))
        if registered.promotion.get("outcome") != AWAITING:
            raise AirflowSkipException(f"no candidate at the gate ({registered.promotion.get('outcome')})")
        self.conf = request(ctx, registered)
        self.trigger_run_id = f"approval__{ctx.run_id}"
        return super().execute(context)


def decide(conf: dict, response: dict) -> dict:
    """The approval run's last task: record the person's decision (or the timeout's) on the candidate, in MLflow
    and in the night's run folder (read into its report); returns the register manifest as it now is (for
    `publish_champion`)."""
    from lepton_tasks.infra.connections import mlflow_tracking_uri
    from lepton_tasks.stages import register

    settings = Settings.from_env()
    who = response.get("responded_by_user")  # None: the timeout chose the default
    registered = register.decide(mlflow_tracking_uri(settings), RegisterManifest.from_dict(conf["registered"]),
                                 response["chosen_options"] == [APPROVE], (who or {}).get("name") or None,
                                 str(response["responded_at"]))
    night = RunPaths.of(settings.data_root, conf["dag_id"], conf["run_id"])
    write_json(night.approval, registered.to_dict())
    if (report := read_json_if_exists(night.report)) is not None:  # the night's report: bring it up to date
        write_json(night.report, pipeline.with_decision(report, registered.to_dict()))
    return registered.to_dict()
