"""The command lines Lepton builds for the processes it starts: `lepton dask-scheduler`, `lepton dask-worker` (and
`make up`, which runs the same), the MLflow server's artifact destination. What they do when run is tested in
`tests/integration/test_dask_hosts.py`, `test_hosts.py` and `test_production_deployment.py`."""

from __future__ import annotations

import pytest

from lepton_tasks.tools import cli, dask_hosts, services


def _command(*argv: str) -> list[str]:
    args, extra = cli._parser().parse_known_args(list(argv))
    return dask_hosts.command(args, extra)


@pytest.fixture
def gpus(monkeypatch):
    """How many GPUs torch can use, as the command builders see it (the CPU path here unless a test says)."""
    def set_count(count: int) -> None:
        monkeypatch.setattr(dask_hosts, "gpu_count", lambda: count)
        monkeypatch.setattr(services, "gpu_count", lambda: count)

    set_count(0)
    return set_count


def test_lepton_dask_commands_run_dask_under_the_supervisor_with_their_options(gpus):
    scheduler = _command("dask-scheduler", "--host", "0.0.0.0", "--port", "9786")
    assert scheduler[1:4] == ["-m", "lepton_tasks.tools.supervisor", "--"]
    assert scheduler[4:] == [scheduler[0], "-m", "lepton_tasks.tools.dask_hosts", "scheduler", "--host", "0.0.0.0",
                             "--port", "9786"]
    worker = _command("dask-worker", "tcp://10.0.0.1:9786", "--nworkers", "3", "--memory-limit", "2GB")
    assert worker[-8:] == ["worker", "tcp://10.0.0.1:9786", "--nworkers", "3", "--nthreads", "1",
                           "--memory-limit", "2GB"]  # any other `dask worker` option passes through
    with pytest.raises(SystemExit):  # only dask-worker takes options it does not know
        cli.main(["validate-spec", "--memory-limit", "2GB"])
    gpus(2)  # dask-cuda: one worker per GPU, its own choice of threads
    assert _command("dask-worker", "tcp://10.0.0.1:9786")[-2:] == ["cuda-worker", "tcp://10.0.0.1:9786"]


def test_make_up_runs_the_same_dask_commands_and_can_keep_mlflow_artifacts_on_a_store(tmp_path, gpus):
    deployment = services.Deployment.from_env({"LEPTON_UP_DIR": str(tmp_path), "LEPTON_DASK_WORKERS": "2",
                                               "LEPTON_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts"})
    commands = services.commands(deployment)
    assert commands["dask-scheduler"] == dask_hosts.scheduler_command("127.0.0.1", 8786, "127.0.0.1:8787")
    assert [name for name in commands if name.startswith("dask-worker")] == ["dask-worker-1", "dask-worker-2"]
    mlflow = commands["mlflow"]
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "s3://bucket/mlartifacts"
    local = services.commands(services.Deployment.from_env({"LEPTON_UP_DIR": str(tmp_path)}))["mlflow"]
    assert local[local.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
