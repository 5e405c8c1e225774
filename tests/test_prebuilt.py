"""The pipeline DAGs a scheduler builds before it forks: a task's parse of the DAG file gets the one built there
only while the DAG file and its spec are byte for byte the same, and then the very DAG a fresh parse would build.
Run in a process of its own, as the scheduler and its task processes are."""

import json
import shutil
import subprocess
import sys

from lepton_tasks.config.settings import PIPELINES_DIR, REPO_ROOT
from lepton_tasks.tools.airflow_env import AirflowEnv

SCHEDULER_THEN_TASKS = """
import json, os, sys
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag
from airflow.serialization.serialized_objects import DagSerialization
from lepton_tasks.orchestration import prebuilt

dags, spec_file, broken = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def task_parse(dag_id):  # what Airflow's task runner does: its parsing context, then this DAG file alone
    os.environ["_AIRFLOW_PARSING_CONTEXT_DAG_ID"] = dag_id
    bag = BundleDagBag(dag_folder=str(dags / "lepton_pipelines.py"), safe_mode=False, load_op_links=False,
                       bundle_path=dags, bundle_name="dags-folder")
    dag = bag.dags[dag_id]
    return dag, json.dumps(DagSerialization.to_dict(dag), sort_keys=True, default=str)

def is_prebuilt(dag):
    return any(dag is built for built in prebuilt._prebuilt.values())

out = {"broken": prebuilt.prebuild([broken]), "built": prebuilt.prebuild([dags / "lepton_pipelines.py"])}
dag, reused = task_parse("lepton_mnist1d")
out["reused"] = is_prebuilt(dag)
original = spec_file.read_text()
spec_file.write_text(original.replace("local_epochs: 5", "local_epochs: 3"))
dag, _ = task_parse("lepton_mnist1d")
out["after_an_edit"] = {"reused": is_prebuilt(dag), "local_epochs": dag.params["local_epochs"]}
spec_file.write_text(original)
prebuilt._prebuilt.clear()
dag, fresh = task_parse("lepton_mnist1d")
out["fresh_equals_reused"] = fresh == reused and not is_prebuilt(dag)
print(json.dumps(out))
"""


def test_a_task_gets_the_prebuilt_dag_only_while_its_files_are_unchanged_and_it_equals_a_fresh_parse(tmp_path):
    pipelines = tmp_path / "pipelines"
    shutil.copytree(PIPELINES_DIR, pipelines)
    spec_file = pipelines / "lepton_mnist1d.yaml"
    assert "local_epochs: 5" in spec_file.read_text()
    broken = tmp_path / "broken_dags.py"
    broken.write_text("raise RuntimeError('a DAG file that does not import')\n")
    env = AirflowEnv.sqlite(tmp_path).env(LEPTON_PIPELINES_DIR=str(pipelines))
    done = subprocess.run([sys.executable, "-c", SCHEDULER_THEN_TASKS, str(REPO_ROOT / "dags"), str(spec_file),
                           str(broken)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["broken"] == [] and "could not prebuild the DAGs of" in done.stdout + done.stderr
    assert result["built"] == ["lepton_house_prices", "lepton_house_prices_resmlp", "lepton_mnist1d", "lepton_sensors",
                               "lepton_sensors_warehouse"]
    assert result["reused"] is True
    assert result["after_an_edit"] == {"reused": False, "local_epochs": 3}
    assert result["fresh_equals_reused"] is True
