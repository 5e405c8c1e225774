"""
### A person at the promotion gate: one DAG `NAME_approval` per pipeline spec with `promotion: {approval: required}`

Each run holds one candidate that passed its night's automatic gate (started by that night's `request_approval`
task, its conf the evidence; see `lepton_tasks.orchestration.approval`). `approve` waits on Airflow's Required
Actions page (or its REST API) for Approve or Reject, at most `promotion.timeout_hours` (then it rejects);
`decide` moves `champion` on approval, tags the decision in MLflow (`lepton.promotion`, who, when) and writes it
into the night's report; `publish_champion` updates the Asset `NAME.champion` (and notifies) only when it moved.
Runs are independent: several nights wait for their decisions side by side.
"""

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Asset, dag, task

from lepton_tasks.config.specs import LoadedSpec, load_all
from lepton_tasks.data.manifests import RegisterManifest
from lepton_tasks.data.windows import parse_ds
from lepton_tasks.orchestration import approval, notify, pipeline

OPEN_DECISIONS = 16  # approval runs waiting at once


def build(loaded: LoadedSpec) -> DAG:
    spec = loaded.spec
    champion = Asset(name=f"{spec.name}.champion", uri=spec.champion_asset_uri)  # as lepton_pipelines declares it

    @dag(
        dag_id=spec.approval_dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=OPEN_DECISIONS,
        is_paused_upon_creation=False,  # it runs only when a night asks: paused, the question would never come
        default_args={"owner": spec.owner, "retries": 2},
        tags=["lepton", "approval", spec.name],
        doc_md=f"Approve `{spec.registered_model_name}` candidates of `{spec.name}` as champion.\n{__doc__}",
    )
    def lepton_approval():
        approve = HITLOperator(
            task_id="approve", subject="{{ dag_run.conf['subject'] }}", body="{{ dag_run.conf['body'] }}",
            options=[approval.APPROVE, approval.REJECT], defaults=[approval.REJECT], retries=0,
            # a plain timedelta: the task's AWAITING_INPUT message to its supervisor cannot carry pendulum's
            response_timeout=timedelta(hours=spec.promotion.timeout_hours),
            doc_md="Wait on the Required Actions page for Approve or Reject of the candidate (the evidence in the "
                   "body); no answer in promotion.timeout_hours rejects it.")

        @task(multiple_outputs=False)
        def decide(response: dict, **context) -> dict:
            """Move `champion` on approval (unless it moved since); tag the decision in MLflow and the report."""
            return approval.decide(context["dag_run"].conf, response)

        announce = notify.notifiers(spec, "champion_change", registered_by="decide")

        @task(outlets=[champion], retries=0, on_success_callback=announce)
        def publish_champion(registered: dict, **context) -> None:
            """Update the champion-model Asset when the decision moved `champion`; skipped otherwise."""
            context["outlet_events"][champion].extra = pipeline.champion_event(
                parse_ds(context["dag_run"].conf["ds"]), RegisterManifest.from_dict(registered))

        publish_champion(decide(approve.output))

    return lepton_approval()


for each in load_all()[0]:
    if each.spec.approval_required:
        globals()[each.spec.approval_dag_id] = build(each)
