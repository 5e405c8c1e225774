"""The whole DAG under Airflow's real scheduler at 1 M and 10 M rows: the run's own memory from one size to the
other (the idle deployment, measured in the same bench, subtracted), and what orchestration adds at 1 M over the
run's own stage seconds. (A plain-script comparison was dropped: a warm, preloaded deployment against a cold
script that pays its imports and a fresh MLflow store compared unlike things.)

Runs are triggered on one Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor) started once,
after a first "cold" run (20,000 rows) that pays the components' start-up and is reported, not counted. The
orchestration figures had demo-size runs of their own; measuring them on the 1 M runs spares `make bench` a third
size.
"""

from __future__ import annotations

import json
import sqlite3
import time
from itertools import count
from pathlib import Path

from bench.common import Repeats, TreeMemory, alternating, record, write_mnist_parts
from lepton_tasks.tools.airflow_env import AirflowEnv, unscheduled_specs

DAG_ID = "lepton_mnist1d"
# the 1M/10M runs: the same pipeline under its own name, experiment and registered model (no scoring DAG)
SCALE_DAG_ID = "lepton_mnist1d_scale"
RUN_TIMEOUT_S = 1800
_runs = count()


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
        self.unpaused: set[str] = set()
        _write_scale_spec(self.pipelines / f"{DAG_ID}.yaml")

    def trigger(self, extra: dict, conf: dict | None = None, dag_id: str = SCALE_DAG_ID) -> str:
        run_id = f"bench-{next(_runs)}"
        self.env.trigger(extra, run_id, conf or {}, dag_id=dag_id)
        if dag_id not in self.unpaused:
            self.env.unpause(extra, dag_id)
            self.unpaused.add(dag_id)
        state = self.env.finished_state(run_id, RUN_TIMEOUT_S, dag_id)
        assert state == "success", f"{run_id} ended {state}:\n{self.env.component_logs()}"
        return run_id

    def run(self, extra: dict, conf: dict | None = None, dag_id: str = SCALE_DAG_ID) -> dict:
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


SCALE_ROWS = (1_000_000, 10_000_000)
COLD_ROWS = 20_000  # the first run pays the components' first parse, imports and MLflow store: small, not counted
SCALE_CONF = {"model_kind": "mlp", "hidden_size": 64, "num_shards": 2, "merge_rounds": 1, "local_epochs": 1,
              "batch_size": 1024}


def _source(deployment: Deployment, rows: int) -> dict:
    return {**SCALE_CONF, "source_uri": str(deployment.env.data_root / "landing" / f"rows-{rows}")}


def _rounds(deployment: Deployment, extra: dict, memory: TreeMemory, work: Path) -> list[dict]:
    """REPEATS rounds of: the full DAG at 10 M rows and the full DAG at 1 M rows, in reverse order every other
    round (so that drift over the bench weighs on both alike). Each DAG run: its wall and stage seconds, rows/s,
    and the peak RSS of the whole deployment's process tree (Airflow's components, the task processes, the run's
    Dask cluster and workers), overall and per task."""
    small, large = SCALE_ROWS

    def dag(rows: int) -> dict:
        memory.reset()
        run = deployment.run(extra, _source(deployment, rows))
        by_task = _peak_by_task(memory, run["tasks"])
        print(f"whole run {rows:,} rows: {run['wall_s']:.0f}s ({run['stages_total_s']:.0f}s in stages), peak "
              f"{memory.peak / 2**30:.2f} GiB, by task (GiB): "
              + ", ".join(f"{task} {rss / 2**30:.2f}" for task, rss in by_task.items()), flush=True)
        return {**run, "rows": rows, "rows_per_s": {stage: rows / s for stage, s in run["stages_s"].items() if s},
                "peak_rss": memory.peak, "peak_rss_by_task": by_task}

    return list(alternating({"dag_large": lambda: dag(large), "dag_small": lambda: dag(small)}))


def _orchestration(rounds: list[dict]) -> tuple[dict, dict]:
    """`orchestration_overhead`: each 1 M DAG run's wall over the sum of its own stages' seconds (what Airflow adds:
    task processes, scheduling, XCom, the cluster's setup task)."""
    runs = [r["dag_small"] for r in rounds]
    rows = SCALE_ROWS[0]
    own = Repeats([r["wall_s"] for r in runs], [r["stages_total_s"] for r in runs])
    where = {"stages_under_scheduler_s": [r["stages_s"] for r in runs],
             "queue_wait_s": [sum(t["queued_s"] or 0 for t in r["tasks"].values()) for r in runs],
             "outside_stages_s": [{k: round(t["outside_stage_s"], 3) for k, t in r["tasks"].items()} for r in runs]}
    overhead = record(own, f"DAG run wall within 15% of the same run's stage seconds ({rows:,} rows)", "s", False,
                      lambda r: r <= 1.15, rows=rows, conf=SCALE_CONF,
                      run="warm runs under the scheduler, after a cold one")
    return overhead, {**where, "scheduler_tasks": [r["tasks"] for r in runs], "rows": rows}


def _memory(rounds: list[dict], idle: int) -> tuple[dict, dict]:
    """`whole_run_10m_memory`: each round's run's own peak RSS at 10 M rows over that at 1 M: the whole process
    tree's peak less `idle`, the same deployment's RSS before any run (Airflow's components and the executor's
    preloaded libraries, a constant that would flatter the ratio); with each stage's seconds and rows/s."""
    small, large = SCALE_ROWS
    keep = ("rows", "wall_s", "stages_s", "rows_per_s", "peak_rss", "peak_rss_by_task")
    runs = [{size: {k: r[f"dag_{size}"][k] for k in keep} for size in ("large", "small")} for r in rounds]
    measured = Repeats([r["large"]["peak_rss"] - idle for r in runs], [r["small"]["peak_rss"] - idle for r in runs])
    summary = record(measured, f"the run's own peak RSS (whole process tree less the idle deployment) at {large:,} "
                     f"rows <= 1.5x that at {small:,}", "bytes", False, lambda r: r <= 1.5, conf=SCALE_CONF,
                     wall_s={str(large): [r["large"]["wall_s"] for r in runs],
                             str(small): [r["small"]["wall_s"] for r in runs]})
    return summary, {"runs": [{"value": r["large"], "baseline": r["small"]} for r in runs], "conf": SCALE_CONF}


def _idle_rss(memory: TreeMemory, settle_s: float = 10.0) -> int:
    """The deployment's RSS with no run going (after the cold run: the executor's preloaded libraries and the
    components' caches in): the median sample over `settle_s` seconds."""
    import statistics

    memory.reset()
    time.sleep(settle_s)
    return int(statistics.median(rss for _, rss in memory.samples))


def scheduler_bench(work: Path) -> dict[str, tuple[dict, dict]]:
    """Everything measured under one Airflow deployment (started once; its first, cold run is reported, not
    counted). Returns {group: (summaries by benchmark name, detail)}."""
    from concurrent.futures import ThreadPoolExecutor

    deployment = Deployment(work / "scheduler")
    landing = deployment.env.data_root / "landing"
    write_mnist_parts(landing / f"rows-{COLD_ROWS}", COLD_ROWS)
    deployment.env.migrate()
    with ThreadPoolExecutor(1) as writer:
        # the measured runs' data is written while Airflow starts and its cold run goes: neither is counted
        written = writer.submit(lambda: [write_mnist_parts(landing / f"rows-{rows}", rows) for rows in SCALE_ROWS])
        with deployment.env.serving(LEPTON_PIPELINES_DIR=str(deployment.pipelines)) as extra, \
                TreeMemory(_component_pids()) as memory:
            cold = deployment.run(extra, _source(deployment, COLD_ROWS))
            written.result()
            idle = _idle_rss(memory)
            rounds = _rounds(deployment, extra, memory, work)
    overhead, orchestration = _orchestration(rounds)
    memory_summary, memory_detail = _memory(rounds, idle)
    orchestration.update(cold_run_wall_s=cold["wall_s"], cold_run_stages_total_s=cold["stages_total_s"])
    memory_summary["idle_deployment_rss"] = memory_detail["idle_deployment_rss"] = idle
    return {"orchestration": ({"orchestration_overhead": overhead}, orchestration),
            "whole_run_10m_memory": ({"whole_run_10m_memory": memory_summary}, memory_detail)}
