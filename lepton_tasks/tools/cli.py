"""`lepton`: scaffold, check and run pipelines.

    lepton new-pipeline NAME --source URI --target COL   # writes dags/pipelines/NAME.yaml + expectations/NAME.json
    lepton validate-spec [FILE ...]                      # exit 1 listing every error; no Airflow needed
    lepton run [NAME] [-c '{"num_shards": 2}']           # one run end to end; prints the report.json path last
    lepton backfill NAME --from 2026-11-08 --to 2026-11-14  # one run per scheduled night (needs `make up`)
    lepton demo-data [NAME]                              # the bundled examples' data
    lepton dask-scheduler [--host H] [--port P]          # a cluster across machines: the scheduler host
    lepton dask-worker tcp://H:P [--nworkers N]          # ... and each worker host
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lepton_tasks.config.settings import REPO_ROOT, Settings, parse_params, redact_uri
from lepton_tasks.config.specs import expectations_dir, find_spec, load_spec, pipelines_dir, spec_files
from lepton_tasks.core.errors import LeptonError
from lepton_tasks.infra.connections import mlflow_tracking_uri
from lepton_tasks.tools import dask_hosts

DEFAULT_PIPELINE = "lepton_mnist1d"


def _newest_report(settings: Settings, dag_id: str, since: float) -> Path | None:
    reports = [p for p in (settings.data_root / dag_id).glob("*/report.json") if p.stat().st_mtime >= since]
    return max(reports, key=lambda p: p.stat().st_mtime, default=None)


def _ui_hints(settings: Settings) -> list[str]:
    home = os.environ.get("AIRFLOW_HOME", str(REPO_ROOT))
    store = redact_uri(mlflow_tracking_uri(settings))
    return [
        f"Airflow UI: AIRFLOW_HOME={home} {REPO_ROOT}/.venv/bin/airflow api-server --port 8080, then "
        f"http://localhost:8080 (user admin, password in {home}/simple_auth_manager_passwords.json.generated)",
        f"MLflow UI:  {REPO_ROOT}/.venv/bin/mlflow ui --port 5000 --backend-store-uri {store}"
        f" --default-artifact-root {settings.mlflow_artifact_root()}, then http://127.0.0.1:5000",
    ]


def _define_local_warehouse(settings: Settings) -> None:
    """The warehouse example's connection, in this process too (it loads the demo table), where none is set."""
    for name, value in settings.local_warehouse_env().items():
        os.environ.setdefault(name, value)


def run(name: str, conf: dict, rows: int | None) -> int:
    """Run the pipeline's DAG once with `airflow dags test` (a real DagRun in the metadata DB).

    Works from any shell or cron: Airflow is the one beside this interpreter, the checkout's keys are loaded
    (`lepton_tasks.tools.airflow_home`), and the metadata DB is migrated first (a no-op when it is current)."""
    from lepton_tasks.tools.airflow_home import airflow_command, checkout_env
    from lepton_tasks.tools.demo_data import ensure_example_data

    settings = Settings.from_env()
    loaded = find_spec(name)
    parse_params(conf, loaded.spec.run_defaults())  # fail here, naming the param, before Airflow starts
    env = checkout_env()
    if "source_uri" not in conf:
        _define_local_warehouse(settings)
        ensure_example_data(loaded.name, settings.data_root, rows)
    migrated = subprocess.run([airflow_command(), "db", "migrate"], env=env, capture_output=True, text=True)
    if migrated.returncode != 0:
        print(f"airflow db migrate failed:\n{migrated.stdout[-2000:]}{migrated.stderr[-2000:]}")
        return migrated.returncode
    started = time.time()
    logical_date = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    code = subprocess.call([airflow_command(), "dags", "test", loaded.name, logical_date, "-c", json.dumps(conf)],
                           env=env)
    report = _newest_report(settings, loaded.name, started)
    if report is None:
        print(f"no report.json was written under {settings.data_root / loaded.name} (airflow exited {code})")
        return code or 1
    status = json.loads(report.read_text())["status"]
    print(f"\nrun {status}: outputs under {report.parent}")
    print("\n".join(_ui_hints(settings)))
    print(report)
    return 0 if status == "success" and code == 0 else 1


def validate_specs(files: list[str]) -> int:
    paths = [Path(f) for f in files] or spec_files()
    if not paths:
        print(f"no pipeline specs in {pipelines_dir()}")
        return 1
    failed = 0
    for path in paths:
        try:
            loaded = load_spec(path)
            if loaded.spec.training.model:  # built, run on a dummy batch, exported (needs torch: only here)
                from lepton_tasks.ml.models import check_spec_model

                check_spec_model(loaded.spec, loaded.spec.run_defaults())
            print(f"ok     {path}  (pipeline {loaded.name}, {loaded.spec.target.task}, metric {loaded.spec.metric})")
        except LeptonError as err:
            failed += 1
            print(f"error  {err}")
    print(f"{len(paths) - failed} valid, {failed} invalid")
    return 1 if failed else 0


def new_pipeline(args: argparse.Namespace) -> int:
    from lepton_tasks.tools.new_pipeline import new_pipeline as make_pipeline

    made = make_pipeline(args.name, args.source, args.target, Settings.from_env().data_root, pipelines_dir(),
                    expectations_dir(), args.format, args.task, args.sample_rows, args.force, args.window_days,
                    args.schedule)
    print(f"wrote {made.spec_path}\nwrote {made.suite_path}\n\nreview before the first run:")
    print("\n".join(f"  - {note}" for note in made.review))
    print(f"\nthen: lepton validate-spec {made.spec_path} && lepton run {args.name}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-pipeline", help="scaffold a spec and an expectation suite from a source")
    new.add_argument("name", help="pipeline (DAG) name, e.g. churn_scores")
    new.add_argument("--source", required=True, help="file, folder or glob (local path or fsspec URI), or a table: "
                     "'conn_id:CONN/table:TABLE[/partition_column:DAY]' (CONN an Airflow connection)")
    new.add_argument("--target", required=True, help="the column to predict")
    new.add_argument("--task", choices=("classification", "regression"), help="default: inferred from the target")
    new.add_argument("--format", choices=("csv", "parquet", "jsonl"), help="default: each file's extension")
    new.add_argument("--sample-rows", type=int, default=100_000,
                     help="rows sampled (uniformly, over the whole source) for quantiles; every row is profiled")
    new.add_argument("--window-days", type=int, default=1,
                     help="with {ds} (or {ds_nodash}, {yyyy}, {mm}, {dd}) in --source, or a partition column: "
                     "days each run reads")
    new.add_argument("--schedule", help='cron expression or preset, e.g. "0 3 * * *" (default: triggered only)')
    new.add_argument("--force", action="store_true", help="overwrite an existing spec and suite")
    check = commands.add_parser("validate-spec", help="check pipeline specs without starting Airflow")
    check.add_argument("files", nargs="*", help=f"spec files (default: every spec in {pipelines_dir()})")
    run_cmd = commands.add_parser("run", help="run a pipeline once end to end")
    run_cmd.add_argument("name", nargs="?", default=DEFAULT_PIPELINE)
    run_cmd.add_argument("-c", "--conf", default="{}", help="JSON params, as in the Airflow trigger form")
    run_cmd.add_argument("--rows", "--samples", type=int, help="demo rows to generate for a bundled example")
    back = commands.add_parser("backfill", help="run every scheduled night in a date range (Airflow backfill)")
    back.add_argument("name")
    back.add_argument("--from", dest="first", required=True, type=_date, help="first night's date (ds), YYYY-MM-DD")
    back.add_argument("--to", dest="last", required=True, type=_date, help="last night's date (ds), YYYY-MM-DD")
    back.add_argument("--timeout-minutes", type=float, default=720, help="give up waiting after this long")
    demo = commands.add_parser("demo-data", help="write a bundled example's demo data to its landing folder")
    demo.add_argument("name", nargs="?", default=DEFAULT_PIPELINE)
    demo.add_argument("--rows", "--samples", type=int)
    commands.add_parser("up", help="start the local production deployment (Airflow, MLflow on PostgreSQL; Dask)")
    commands.add_parser("down", help="stop what `lepton up` started")
    dask_hosts.parser(commands)
    return parser


def _date(text: str):
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date (YYYY-MM-DD)") from None


def backfill(args: argparse.Namespace) -> int:
    """Backfill, wait, print each night's report.json path last (date order); 1 if a night failed."""
    from lepton_tasks.tools.backfill import backfill as run_backfill

    done, reports = run_backfill(find_spec(args.name), args.first, args.last, args.timeout_minutes)
    failed = [str(n.logical_date.date()) for n in done if n.state != "success"]
    print(f"{len(done) - len(failed)} night(s) succeeded" + (f", failed: {', '.join(failed)}" if failed else ""))
    print("\n".join(reports))
    return 1 if failed else 0


def services_up() -> int:
    """Start the production deployment with bundled demo data in place; print the URLs and the login."""
    from lepton_tasks.tools import services
    from lepton_tasks.tools.demo_data import EXAMPLES, WAREHOUSE_EXAMPLES, ensure_example_data

    deployment = services.Deployment.from_env()
    for example in EXAMPLES:  # every bundled pipeline runs from the UI with its defaults
        ensure_example_data(example, deployment.data_root, None)
    urls = services.up(deployment)
    os.environ.update(services.warehouse_env(deployment))
    for example in WAREHOUSE_EXAMPLES:  # its table, once the deployment's PostgreSQL has its database
        ensure_example_data(example, deployment.data_root, None)
    print(f"Airflow UI:     {urls['airflow']}  (user {urls['username']}, password in {urls['password_file']})")
    print(f"MLflow UI:      {urls['mlflow']}")
    print(f"Dask dashboard: {urls['dask_dashboard']}  (scheduler {urls['dask_scheduler']})")
    print(f"Logs:           {urls['logs']};  `source {urls['env']}` points airflow/mlflow commands at it")
    print("Stop with `make down`.")
    return 0


def services_down() -> int:
    from lepton_tasks.tools import services

    stopped = services.down(services.Deployment.from_env())
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "dask-worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("dask-scheduler", "dask-worker"):
        command = dask_hosts.command(args, extra)
        os.execv(command[0], command)  # this process becomes the supervisor: Ctrl-C or SIGTERM stops it all
    try:
        if args.command == "run":
            sys.exit(run(args.name, json.loads(args.conf), args.rows))
        if args.command == "validate-spec":
            sys.exit(validate_specs(args.files))
        if args.command == "new-pipeline":
            sys.exit(new_pipeline(args))
        if args.command == "backfill":
            sys.exit(backfill(args))
        if args.command == "up":
            sys.exit(services_up())
        if args.command == "down":
            sys.exit(services_down())
        from lepton_tasks.tools.demo_data import EXAMPLES, WAREHOUSE_EXAMPLES, ensure_example_data

        examples = [*EXAMPLES, *WAREHOUSE_EXAMPLES]
        if args.name not in examples:
            sys.exit(f"lepton: no bundled demo data for '{args.name}' (examples: {', '.join(examples)})")
        settings = Settings.from_env()
        _define_local_warehouse(settings)
        print(ensure_example_data(args.name, settings.data_root, args.rows))
    except (LeptonError, json.JSONDecodeError) as err:
        sys.exit(f"lepton: {err}")


if __name__ == "__main__":
    main()
