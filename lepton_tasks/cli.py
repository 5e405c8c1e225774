"""`lepton`: run a pipeline once end to end, or make the demo data.

    lepton run [lepton_mnist1d] [-c '{"num_shards": 2}']   # prints the report.json path last
    lepton demo-data --samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lepton_tasks.config import MNIST1D, REPO_ROOT, Settings, mlflow_tracking_uri, parse_params
from lepton_tasks.errors import LeptonError


def _ensure_demo_data(settings: Settings, samples: int) -> None:
    from lepton_tasks.demo_data import write_mnist1d

    landing = settings.data_root / "landing" / "mnist1d"
    if not any(landing.glob("*.parquet")):
        print(f"writing {samples} MNIST-1D rows to {write_mnist1d(landing, samples)}")


def _newest_report(settings: Settings, dag_id: str, since: float) -> Path | None:
    reports = [p for p in (settings.data_root / dag_id).glob("*/report.json") if p.stat().st_mtime >= since]
    return max(reports, key=lambda p: p.stat().st_mtime, default=None)


def _ui_hints(settings: Settings) -> list[str]:
    home = os.environ.get("AIRFLOW_HOME", str(REPO_ROOT))
    return [
        f"Airflow UI: AIRFLOW_HOME={home} {REPO_ROOT}/.venv/bin/airflow api-server --port 8080, then "
        f"http://localhost:8080 (user admin, password in {home}/simple_auth_manager_passwords.json.generated)",
        f"MLflow UI:  {REPO_ROOT}/.venv/bin/mlflow ui --port 5000 --backend-store-uri {mlflow_tracking_uri(settings)}"
        f" --default-artifact-root {settings.mlflow_artifact_root()}, then http://127.0.0.1:5000",
    ]


def run(dag_id: str, conf: dict, samples: int) -> int:
    """Run the DAG once with `airflow dags test` (a real DagRun in the metadata DB); print where results are."""
    settings = Settings.from_env()
    parse_params(conf)  # fail here, naming the param, before Airflow starts
    if dag_id == MNIST1D.name and "source_uri" not in conf:
        _ensure_demo_data(settings, samples)
    started = time.time()
    logical_date = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    command = ["airflow", "dags", "test", dag_id, logical_date, "-c", json.dumps(conf)]
    code = subprocess.call(command)
    report = _newest_report(settings, dag_id, started)
    if report is None:
        print(f"no report.json was written under {settings.data_root / dag_id} (airflow exited {code})")
        return code or 1
    status = json.loads(report.read_text())["status"]
    print(f"\nrun {status}: outputs under {report.parent}")
    print("\n".join(_ui_hints(settings)))
    print(report)
    return 0 if status == "success" and code == 0 else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lepton", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run a pipeline once end to end")
    run_cmd.add_argument("dag_id", nargs="?", default=MNIST1D.name)
    run_cmd.add_argument("-c", "--conf", default="{}", help="JSON params, as in the Airflow trigger form")
    run_cmd.add_argument("--samples", type=int, default=5000, help="demo rows to generate if none are there")
    demo = commands.add_parser("demo-data", help="write the MNIST-1D demo data to the landing folder")
    demo.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            sys.exit(run(args.dag_id, json.loads(args.conf), args.samples))
        _ensure_demo_data(Settings.from_env(), args.samples)
    except (LeptonError, json.JSONDecodeError) as err:
        sys.exit(f"lepton: {err}")


if __name__ == "__main__":
    main()
