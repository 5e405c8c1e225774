"""Telling someone: the spec's `notify:` section as Airflow notifiers (e-mail over an SMTP connection, a JSON
webhook over an HTTP connection).

Events: `failure` (the report task fails whenever a stage did: its on_failure_callback), `champion_change`
(publish_champion succeeds only when `champion` moved: its on_success_callback) and `drift` (called by the
drift task when the data moved more than `drift_max`). Messages are Jinja templates rendered by Airflow with
the task's context.
"""

from __future__ import annotations

import logging

from airflow.providers.http.notifications.http import HttpNotifier
from airflow.providers.smtp.notifications.smtp import SmtpNotifier

from lepton_tasks.config.specs import PipelineSpec

log = logging.getLogger(__name__)

RUN = "{{ dag.dag_id }} run {{ run_id }}"
MESSAGES = {
    "failure": (f"[lepton] {RUN} failed", "The run failed; its report: {{ ti.xcom_pull(task_ids='report') or "
                "'see the task logs' }}. Stage summaries are in the run folder."),
    # why: a person's decision (an approval run's `decide`), else the automatic gate's
    "champion_change": (f"[lepton] {RUN}: new champion",
                        "{% set r = ti.xcom_pull(task_ids='TASK') %}Model {{ r.model_name }} version "
                        "{{ r.model_version }} is now champion (was {{ r.champion_before or 'none' }}): "
                        "{{ (r.promotion.get('approval') or r.promotion).reason }}."),
}


def notifiers(spec: PipelineSpec, event: str, text: str | None = None, registered_by: str = "register") -> list:
    """The notifiers for `event` (none when the spec does not ask for it); `text` replaces the event's body;
    `registered_by`: the task whose XCom is the register manifest (`decide`, in an approval run)."""
    if not spec.notifies(event):
        return []
    subject, body = MESSAGES.get(event, (f"[lepton] {RUN}: {event}", ""))
    body = text if text is not None else body.replace("task_ids='TASK'", f"task_ids='{registered_by}'")
    made = []
    if spec.notify.email:
        made.append(SmtpNotifier(to=spec.notify.email.to, from_email=spec.notify.email.from_email, subject=subject,
                                 html_content=f"<p>{body}</p>", smtp_conn_id=spec.notify.email.conn_id))
    if spec.notify.webhook:
        payload = {"pipeline": spec.name, "event": event, "dag_id": "{{ dag.dag_id }}", "run_id": "{{ run_id }}",
                   "subject": subject, "text": body}
        made.append(HttpNotifier(http_conn_id=spec.notify.webhook.conn_id, endpoint=spec.notify.webhook.endpoint,
                                 json=payload, headers={"Content-Type": "application/json"}))
    return made


def send(spec: PipelineSpec, event: str, context, text: str) -> None:
    """Notify now, from inside a task (the drift alarm). A notifier that fails is logged, never fails the run."""
    for notifier in notifiers(spec, event, text.replace("{", "{{ '{' }}")):
        try:
            notifier(context)
        except Exception as err:
            log.warning("%s could not send the %s notification: %s", type(notifier).__name__, event, err)
