"""The whole DAG under Airflow's real scheduler: its overhead at the demo size, and its memory from 1 M to 10 M rows.

Runs are triggered on one Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor) started once
for both, after a first "cold" run that pays the components' start-up and is reported, not counted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from itertools import count
from pathlib import Path

from bench.common import PROBE, Repeats, TreeMemory, interleaved, mnist_frame, record, write_mnist_parts
from tests.integration.airflow_env import AirflowEnv, unscheduled_specs

DEMO_ROWS = 5000
DAG_ID = "lepton_mnist1d"
# the 1M/10M runs: the same pipeline under its own name and registered model, so that the champion each run
# re-scores on its held-out rows (register) is one of these runs', not the demo-size CNN of the orchestration runs
SCALE_DAG_ID = "lepton_mnist1d_scale"
RUN_TIMEOUT_S = 1800
_runs = count()


def _plain(data_root: Path, rows: int, conf: dict) -> dict:
    """The plain-script run in its own process: its stage seconds, and the process's wall (imports included)."""
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


def _airflow_times(env: AirflowEnv, run_id: str, stage_s: dict) -> dict:
    """What Airflow's metadata DB recorded of one run: its wall (the DAG run's start to its end, as the UI shows
    it), and per task its queue wait and the part of its run time outside the stage function (task process
    start, DAG parse, imports, XCom)."""
    with sqlite3.connect(env.home / "airflow.db") as db:
        start, end = db.execute("SELECT start_date, end_date FROM dag_run WHERE run_id = ?", (run_id,)).fetchone()
        rows = db.execute("SELECT task_id, queued_dttm, start_date, end_date FROM task_instance WHERE run_id = ? "
                          "ORDER BY start_date", (run_id,)).fetchall()
    tasks = {task: {"queued_s": _seconds(queued, t_start), "run_s": _seconds(t_start, t_end),
                    "outside_stage_s": (_seconds(t_start, t_end) or 0) - stage_s.get(task, 0.0),
                    "start": t_start, "end": t_end}
             for task, queued, t_start, t_end in rows}
    return {"wall_s": _seconds(start, end), "tasks": tasks}


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "success", report.get("failed_stage")
    return {name: stage["seconds"] for name, stage in report["stages"].items()}


class Deployment:
    """One Airflow serving this repo's DAGs on SQLite, runs triggered one at a time."""

    def __init__(self, work: Path):
        self.env = AirflowEnv.sqlite(work)
        self.pipelines = unscheduled_specs(work / "pipelines")
        _write_scale_spec(self.pipelines / f"{DAG_ID}.yaml")

    def trigger(self, extra: dict, conf: dict | None = None, dag_id: str = DAG_ID) -> str:
        run_id = f"bench-{next(_runs)}"
        self.env.airflow("dags", "trigger", dag_id, "--run-id", run_id, "-c", json.dumps(conf or {}), **extra)
        self.env.airflow("dags", "unpause", dag_id, **extra)
        state = self.env.finished_state(run_id, RUN_TIMEOUT_S, dag_id)
        assert state == "success", f"{run_id} ended {state}:\n{self.env.component_logs()}"
        return run_id

    def run(self, extra: dict, conf: dict | None = None, dag_id: str = DAG_ID) -> dict:
        run_id = self.trigger(extra, conf, dag_id)
        stage_s = _stage_seconds(self.env.data_root / dag_id / run_id)
        return {"run_id": run_id, **_airflow_times(self.env, run_id, stage_s), "stages_s": stage_s,
                "stages_total_s": sum(stage_s.values())}


def _peak_by_task(memory: TreeMemory, tasks: dict) -> dict[str, int]:
    """The whole tree's peak RSS while each task ran (tasks that overlap, such as the cluster's setup beside ingest
    or its teardown beside merge, share their windows): where a run's peak comes from."""
    from datetime import UTC, datetime

    def epoch(text: str) -> float:  # Airflow keeps UTC; SQLite hands it back without a zone
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()

    return {task: memory.peak_between(epoch(times["start"]), epoch(times["end"]))
            for task, times in tasks.items() if times["start"] and times["end"]}


def _write_scale_spec(demo_spec: Path) -> None:
    """SCALE_DAG_ID's spec beside the demo's: the same pipeline, its own experiment and registered model."""
    import yaml

    spec = yaml.safe_load(demo_spec.read_text())
    spec = {**spec, "name": SCALE_DAG_ID, "mlflow": {"experiment": SCALE_DAG_ID,
                                                     "registered_model": SCALE_DAG_ID.replace("_", "-")}}
    spec.pop("score", None)
    (demo_spec.parent / f"{SCALE_DAG_ID}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _component_pids() -> list[int]:
    """Airflow's components, which `AirflowEnv.serving` starts as children of this process."""
    import psutil

    return [p.pid for p in psutil.Process().children() if "airflow" in " ".join(p.cmdline())]


def _orchestration(deployment: Deployment, extra: dict, work: Path) -> tuple[dict, dict, dict]:
    """The nightly DAG at the demo size and defaults under the scheduler, interleaved with the same stage
    functions run one after another as a plain script in its own process.
    `orchestration_overhead`: each DAG run's wall over the sum of its own stages' seconds (what Airflow adds:
    task processes, scheduling, XCom, the cluster's setup task). `orchestration_vs_script`: the DAG run's wall
    over the script process's wall (its imports included)."""
    plain_dirs = count()

    def dag_run() -> tuple[float, dict]:
        run = deployment.run(extra)
        return run["wall_s"], run

    def script() -> tuple[float, dict]:
        plain = _plain(work / f"plain-{next(plain_dirs)}", DEMO_ROWS, {})
        return plain["process_wall_s"], plain

    vs_script = interleaved(dag_run, script, label="DAG run vs plain script")
    runs = [d["value"] for d in vs_script.details]
    own = Repeats([r["wall_s"] for r in runs], [r["stages_total_s"] for r in runs])
    where = {"stages_under_scheduler_s": [r["stages_s"] for r in runs],
             "stages_in_script_s": [d["baseline"]["stages"] for d in vs_script.details],
             "queue_wait_s": [sum(t["queued_s"] or 0 for t in r["tasks"].values()) for r in runs],
             "outside_stages_s": [{k: round(t["outside_stage_s"], 3) for k, t in r["tasks"].items()} for r in runs]}
    overhead = record(own, "DAG run wall within 15% of the same run's stage seconds (demo size)", "s", False,
                      lambda r: r <= 1.15, rows=DEMO_ROWS, run="warm runs under the scheduler, after a cold one")
    script_ratio = record(vs_script, "DAG run wall within 15% of the plain script's process wall (demo size)", "s",
                          False, lambda r: r <= 1.15, rows=DEMO_ROWS)
    return overhead, script_ratio, {**where, "scheduler_tasks": [r["tasks"] for r in runs], "rows": DEMO_ROWS}


SCALE_ROWS = (1_000_000, 10_000_000)
SCALE_CONF = {"model_kind": "mlp", "hidden_size": 64, "num_shards": 2, "merge_rounds": 1, "local_epochs": 1,
              "batch_size": 1024}


def _memory(deployment: Deployment, extra: dict, memory: TreeMemory, sizes=SCALE_ROWS) -> tuple[dict, dict]:
    """The full DAG on 1 M and 10 M MNIST-1D-shaped rows (20 Parquet files at 10 M), interleaved: peak RSS of the
    whole deployment's process tree during each run (Airflow's components, the task processes, the run's Dask
    cluster and workers), and each stage's seconds and rows/s."""
    small, large = sizes

    def at(rows: int) -> tuple[float, dict]:
        memory.reset()
        run = deployment.run(extra, {**SCALE_CONF, "source_uri": f"landing/rows-{rows}/"}, SCALE_DAG_ID)
        rates = {stage: rows / s for stage, s in run["stages_s"].items() if s}
        by_task = _peak_by_task(memory, run["tasks"])
        print(f"whole run {rows:,} rows: {run['wall_s']:.0f}s, peak {memory.peak / 2**30:.2f} GiB, by task (GiB): "
              + ", ".join(f"{task} {rss / 2**30:.2f}" for task, rss in by_task.items()), flush=True)
        return memory.peak, {"rows": rows, "wall_s": run["wall_s"], "stages_s": run["stages_s"],
                             "rows_per_s": rates, "peak_rss": memory.peak, "peak_rss_by_task": by_task}

    measured = interleaved(lambda: at(large), lambda: at(small), label="whole run 10M vs 1M peak RSS")
    summary = record(measured, f"peak RSS of the whole process tree at {large:,} rows <= 1.5x that at {small:,}",
                     "bytes", False, lambda r: r <= 1.5, conf=SCALE_CONF,
                     wall_s={str(large): [d["value"]["wall_s"] for d in measured.details],
                             str(small): [d["baseline"]["wall_s"] for d in measured.details]})
    return summary, {"runs": measured.details, "conf": SCALE_CONF}


def scheduler_bench(work: Path) -> dict[str, tuple[dict, dict]]:
    """Everything measured under one Airflow deployment (started once; its first, cold run is reported, not
    counted): the orchestration figures at the demo size, then the whole DAG's memory from 1 M to 10 M rows.
    Returns {group: (summaries by benchmark name, detail)}."""
    deployment = Deployment(work / "scheduler")
    landing = deployment.env.data_root / "landing"
    (landing / "mnist1d").mkdir(parents=True)
    mnist_frame(DEMO_ROWS).to_parquet(landing / "mnist1d" / "mnist1d.parquet", index=False)
    for rows in SCALE_ROWS:
        write_mnist_parts(landing / f"rows-{rows}", rows)
    deployment.env.migrate()
    with deployment.env.serving(LEPTON_PIPELINES_DIR=str(deployment.pipelines)) as extra, \
            TreeMemory(_component_pids()) as memory:
        time.sleep(5)
        idle = memory.peak  # the deployment before any run
        cold = deployment.run(extra)
        overhead, vs_script, orchestration = _orchestration(deployment, extra, work)
        memory_summary, memory_detail = _memory(deployment, extra, memory)
    orchestration.update(cold_run_wall_s=cold["wall_s"], cold_run_stages_total_s=cold["stages_total_s"])
    memory_summary["idle_deployment_rss"] = memory_detail["idle_deployment_rss"] = idle
    return {"orchestration": ({"orchestration_overhead": overhead, "orchestration_vs_script": vs_script},
                              orchestration),
            "whole_run_10m_memory": ({"whole_run_10m_memory": memory_summary}, memory_detail)}
