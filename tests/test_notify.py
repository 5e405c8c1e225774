"""The spec's `notify:` section as real Airflow notifiers: which events, what they carry, and a receiver that is
down never failing the run."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lepton_tasks.config.specs import EmailSection, NotifySection, WebhookSection
from lepton_tasks.orchestration.notify import notifiers, send
from tests.conftest import MNIST_SPEC


def _spec(**notify):
    return MNIST_SPEC.spec.model_copy(update={"notify": NotifySection(**notify)})


def _context():
    from airflow.sdk import DAG

    return {"dag": DAG("lepton_mnist1d", schedule=None), "run_id": "manual__1"}


def test_only_the_events_the_spec_lists_get_notifiers_one_per_channel():
    from airflow.providers.http.notifications.http import HttpNotifier
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    spec = _spec(on=["failure"], email=EmailSection(to=["ops@example.com"]), webhook=WebhookSection(conn_id="hook"))
    made = notifiers(spec, "failure")
    assert [type(n) for n in made] == [SmtpNotifier, HttpNotifier]
    assert notifiers(spec, "drift") == [] and notifiers(MNIST_SPEC.spec, "failure") == []  # not asked / no section


@pytest.fixture
def receiver(monkeypatch):
    """A real HTTP endpoint on loopback, named by an Airflow connection (`hook`); what it received."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AIRFLOW_CONN_HOOK", f"http://127.0.0.1:{server.server_port}")
    yield received
    server.shutdown()


def test_the_drift_alarm_posts_the_pipeline_event_run_and_text_to_the_webhook(receiver):
    send(_spec(webhook=WebhookSection(conn_id="hook", endpoint="alerts")), "drift", _context(), "PSI 0.4 on {x}")
    [(path, payload)] = receiver
    assert path == "/alerts"
    assert payload == {"pipeline": "lepton_mnist1d", "event": "drift", "dag_id": "lepton_mnist1d",
                       "run_id": "manual__1", "subject": "[lepton] lepton_mnist1d run manual__1: drift",
                       "text": "PSI 0.4 on {x}"}  # braces in the text are not taken for a template


def test_a_receiver_that_is_down_is_logged_and_never_fails_the_task(monkeypatch, caplog):
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("AIRFLOW_CONN_HOOK", f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="lepton_tasks.orchestration.notify"):
        send(_spec(webhook=WebhookSection(conn_id="hook")), "drift", _context(), "moved")
    assert "HttpNotifier could not send the drift notification" in caplog.text
    assert "onnection refused" in caplog.text or "Max retries" in caplog.text  # the network, not a bug of ours
