"""The whole run: Airflow's overhead over the same stage functions in a plain script, and cost as data grows."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PROBE, mnist_frame, record
from tests.integration.airflow_env import AirflowEnv, unscheduled_specs

DEMO_ROWS = 5000


def _plain(data_root: Path, rows: int, conf: dict) -> dict:
    """The plain-script run in its own process: its stage seconds, and the process's wall time (imports too)."""
    env = {**os.environ, "LEPTON_DATA_ROOT": str(data_root), "MLFLOW_TRACKING_URI": f"sqlite:///{data_root}/mlflow.db",
           "GX_ANALYTICS_ENABLED": "false"}
    started = time.perf_counter()
    done = subprocess.run([*PROBE, "plain-run", str(data_root), str(rows), json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"plain run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - started}


def _seconds(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not (start and end):
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _airflow_times(env: AirflowEnv, run_id: str | None, stage_s: dict) -> dict:
    """What Airflow's metadata DB recorded of one run (`run_id`, or the only one): its wall (first task start to
    last task end), and per task its queue wait and the part of its run time outside the stage function (task
    process start, DAG parse, imports, XCom)."""
    with sqlite3.connect(env.home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, queued_dttm, start_date, end_date FROM task_instance "
                          "WHERE run_id = coalesce(?, run_id) ORDER BY start_date", (run_id,)).fetchall()
    tasks = {task: {"queued_s": _seconds(queued, start), "run_s": _seconds(start, end),
                    "outside_stage_s": _seconds(start, end) - stage_s.get(task, 0.0)}
             for task, queued, start, end in rows}
    return {"wall_s": _seconds(rows[0][2], max(r[3] for r in rows)), "tasks": tasks,
            "outside_stages_s": sum(t["outside_stage_s"] for t in tasks.values())}


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "success", report.get("failed_stage")
    return {name: stage["seconds"] for name, stage in report["stages"].items()}


def _demo_env(work: Path) -> AirflowEnv:
    env = AirflowEnv.sqlite(work)
    landing = env.data_root / "landing" / "mnist1d"
    landing.mkdir(parents=True, exist_ok=True)
    mnist_frame(DEMO_ROWS).to_parquet(landing / "mnist1d.parquet", index=False)
    env.migrate()
    return env


def _under_scheduler(work: Path, preload: bool = True) -> dict[str, dict]:
    """Two triggered runs under the scheduler (PreloadingLocalExecutor; api-server, scheduler, dag-processor
    running), one after the other: the first after start-up ("cold": Airflow's api-server builds its execution
    API on the first task's first call), then a nightly run's steady state ("warm")."""
    env = _demo_env(work)
    runs = {}
    no_preload = {} if preload else {"LEPTON_PRELOAD_MODULES": ""}
    with env.serving(LEPTON_PIPELINES_DIR=str(unscheduled_specs(work / "pipelines")), **no_preload) as extra:
        for run_id in ("cold", "warm"):
            env.airflow("dags", "trigger", "lepton_mnist1d", "--run-id", run_id, **extra)
            env.airflow("dags", "unpause", "lepton_mnist1d", **extra)
            assert env.finished_state(run_id, 900) == "success", env.component_logs()
            stage_s = _stage_seconds(env.data_root / "lepton_mnist1d" / run_id)
            runs[run_id] = {**_airflow_times(env, run_id, stage_s), "stages_s": stage_s}
    return runs


def _dags_test(work: Path) -> dict:
    """One `airflow dags test` run: every task in the CLI's process."""
    env = _demo_env(work)
    started = time.perf_counter()
    done, run_dir = env.dags_test({}, "2026-07-01T02:00:00+00:00")
    cli_wall = time.perf_counter() - started
    stage_s = _stage_seconds(run_dir)
    return {**_airflow_times(env, None, stage_s), "cli_wall_s": cli_wall, "stages_s": stage_s}


def orchestration_bench(work: Path) -> tuple[dict, dict]:
    """The nightly DAG at the demo size and defaults, under the scheduler (the headline: a nightly run on a
    running deployment) and under `airflow dags test`, vs the same stage functions one after another in a plain
    script (the sum of their seconds: their compute)."""
    plain = _plain(work / "plain", DEMO_ROWS, {})
    runs = _under_scheduler(work / "scheduler")
    warm, cold = runs["warm"], runs["cold"]
    in_process = _dags_test(work / "dags-test")
    overhead = warm["wall_s"] / plain["total"] - 1
    where = {
        "scheduler_run_wall_s": warm["wall_s"],
        "scheduler_outside_stages_s": warm["outside_stages_s"],  # task process start, DAG parse, XCom, state
        "scheduler_queue_wait_s": sum(t["queued_s"] or 0 for t in warm["tasks"].values()),
        "cold_run_wall_s": cold["wall_s"],  # the first run after start-up
        "cold_overhead": cold["wall_s"] / plain["total"] - 1,
        "dags_test_run_wall_s": in_process["wall_s"],
        "dags_test_cli_wall_s": in_process["cli_wall_s"],  # + CLI start, DAG parse, DB set-up: not in a run
        "dags_test_overhead": in_process["wall_s"] / plain["total"] - 1,
        "script_process_wall_s": plain["process_wall_s"],  # the script's own imports and start-up included
        "dask_cluster_start_stop_s_per_task": plain["dask_cluster_start_stop_s"],
        "dask_cluster_tasks": 2,  # shard and train each start one
        "mlflow_register_s": warm["stages_s"]["register"],
        "stages_under_scheduler_s": warm["stages_s"],
        "stages_in_script_s": plain["stages"],
    }
    summary = record(warm["wall_s"], plain["total"],
                     "DAG run within 15% of the same stages in a script (demo size)", "s", False, overhead < 0.15,
                     overhead=overhead, run="second triggered run under the scheduler",
                     where_the_time_goes=where)
    return summary, {"overhead": overhead, **where, "scheduler_tasks": warm["tasks"],
                     "cold_run_tasks": cold["tasks"], "dags_test_tasks": in_process["tasks"], "rows": DEMO_ROWS}


SCALE_CONF = {"model_kind": "mlp", "hidden_size": 64, "merge_rounds": 1, "local_epochs": 1}


def scale_bench(work: Path, factors=(1, 10, 100)) -> tuple[dict, dict, dict]:
    """Cost of the whole run (plain script, every stage) at 1x, 10x, 100x the demo rows, one epoch budget."""
    curve = []
    for factor in factors:
        rows = DEMO_ROWS * factor
        run = _plain(work / f"scale-{factor}", rows, SCALE_CONF)
        curve.append({"factor": factor, "rows": rows, "total_s": run["total"], "stages_s": run["stages"]})
        print(f"scale {factor:>3}x ({rows} rows): {run['total']:.1f}s", flush=True)
    base = curve[0]["total_s"]
    results = {}
    for point in curve[1:]:
        cost = point["total_s"] / base
        results[point["factor"]] = record(point["total_s"], base * point["factor"],
                                          f"near-linear: <= 1.2 x {point['factor']} x the 1x cost", "s", False,
                                          cost <= 1.2 * point["factor"], cost_ratio=cost, rows=point["rows"],
                                          rows_ratio=point["factor"], baseline_is="linear extrapolation of 1x")
    return results[10], results[100], {"curve": curve, "conf": SCALE_CONF, "python": sys.version.split()[0]}
