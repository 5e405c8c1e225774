"""The whole run: Airflow's overhead over the same stage functions in a plain script, and cost as data grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import PROBE, mnist_frame, record
from tests.integration.airflow_env import AirflowEnv

DEMO_ROWS = 5000


def _plain(data_root: Path, rows: int, conf: dict) -> dict:
    env = {**os.environ, "LEPTON_DATA_ROOT": str(data_root), "MLFLOW_TRACKING_URI": f"sqlite:///{data_root}/mlflow.db",
           "GX_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([*PROBE, "plain-run", str(data_root), str(rows), json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"plain run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def orchestration_bench(work: Path) -> tuple[dict, dict]:
    """`airflow dags test` of the nightly DAG at the demo size and defaults vs the same stages in a script."""
    env = AirflowEnv.sqlite(work / "airflow")
    landing = env.data_root / "landing" / "mnist1d"
    landing.mkdir(parents=True, exist_ok=True)
    mnist_frame(DEMO_ROWS).to_parquet(landing / "mnist1d.parquet", index=False)
    env.migrate()
    started = time.perf_counter()
    _, run_dir = env.dags_test({}, "2026-07-01T02:00:00+00:00")
    dag_wall = time.perf_counter() - started
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "success", report.get("failed_stage")
    in_airflow = {name: stage["seconds"] for name, stage in report["stages"].items()}
    plain = _plain(work / "plain", DEMO_ROWS, {})
    overhead = dag_wall / plain["total"] - 1
    where = {
        "airflow_s": dag_wall - sum(in_airflow.values()),  # CLI start, DAG parse, task start-up, XCom, state
        "dask_cluster_start_stop_s_per_task": plain["dask_cluster_start_stop_s"],
        "dask_cluster_tasks": 2,  # shard and train each start one
        "mlflow_register_s": in_airflow["register"],
        "stages_in_airflow_s": in_airflow,
        "stages_in_script_s": plain["stages"],
    }
    summary = record(dag_wall, plain["total"], "DAG run within 15% of the same stages in a script (demo size)",
                     "s", False, overhead < 0.15, overhead=overhead, where_the_time_goes=where)
    return summary, {"dag_wall_s": dag_wall, "script_s": plain["total"], "overhead": overhead, **where,
                     "rows": DEMO_ROWS, "params": report["params"]}


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
