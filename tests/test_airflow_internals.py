"""The private Airflow API that the preloading executor and the prebuilt DAGs use
(`lepton_tasks.orchestration.airflow_internals`) is still there in the installed Airflow: an upgrade that changes
it fails here, naming what changed."""

from lepton_tasks.orchestration.airflow_internals import WorkSentHook, problems, result_queue_reader


def test_the_installed_airflow_still_has_every_private_api_lepton_uses():
    assert problems() == []


def test_the_work_sent_hook_hears_each_batch_that_local_executor_hands_its_workers(monkeypatch):
    from airflow.executors.local_executor import LocalExecutor

    class Hearing(WorkSentHook, LocalExecutor):
        heard: list = []

        def on_work_sent(self, workload_list) -> None:
            self.heard.append(list(workload_list))

    sent = []
    monkeypatch.setattr(LocalExecutor, "_process_workloads", lambda self, workloads: sent.append(workloads))
    executor = Hearing(parallelism=1)
    executor._process_workloads(["a", "b"])  # what the scheduler's heartbeat calls with the queued workloads
    assert sent == [["a", "b"]] and executor.heard == [["a", "b"]]


def test_the_result_queue_reader_is_what_a_worker_result_arrives_on(monkeypatch):
    from multiprocessing.connection import wait

    from lepton_tasks.orchestration.executor import PreloadingLocalExecutor

    monkeypatch.setenv("LEPTON_PRELOAD_MODULES", "")  # nothing to preload: the queue is what is tested
    executor = PreloadingLocalExecutor(parallelism=1)
    executor.start()
    try:
        assert wait([result_queue_reader(executor)], timeout=0) == []
        executor.result_queue.put(("key", "success", None))
        assert wait([result_queue_reader(executor)], timeout=5) == [result_queue_reader(executor)]
        assert executor.result_queue.get() == ("key", "success", None)
    finally:
        executor.end()
