"""`lepton backfill NAME --from YYYY-MM-DD --to YYYY-MM-DD`: one DAG run per scheduled night in the range,
through Airflow 3's own backfill (what the UI's Backfill dialog creates), run by the scheduler.

It creates the backfill (`airflow backfill create`, reprocessing nights that already ran, so rerunning a night
is idempotent: the same DAG run is cleared and run again, which finds its MLflow run and model version by tags
instead of making new ones), waits for every night to finish, and prints each night's `report.json` path, one
per line, as its last lines, in date order. Exit status 1 when a night failed.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from lepton_tasks.config.settings import Settings
from lepton_tasks.config.specs import LoadedSpec
from lepton_tasks.core.errors import LeptonError
from lepton_tasks.core.storage import RunPaths

TERMINAL = ("success", "failed")


@dataclass(frozen=True)
class Night:
    logical_date: dt.datetime
    run_id: str | None = None
    state: str | None = None


def nights(schedule: str, first: dt.date, last: dt.date) -> list[dt.datetime]:
    """The schedule's ticks whose date (`ds`) is in [first, last], in order."""
    from croniter import croniter

    start = dt.datetime.combine(first, dt.time(), dt.UTC)
    ticks, cursor = [], croniter(schedule, start - dt.timedelta(microseconds=1))
    while (tick := cursor.get_next(dt.datetime)).date() <= last:
        ticks.append(tick)
    return ticks


def _airflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    from lepton_tasks.tools.airflow_home import airflow_command

    return subprocess.run([airflow_command(), *args], env=env, capture_output=True, text=True)


def _check(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        raise LeptonError(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def _use_metadata_db(env: dict) -> None:
    """Point this process's Airflow at the deployment `env` names (before Airflow is first imported here): the
    wait reads the metadata DB in this process, as `airflow dags list-runs` would, without starting an `airflow`
    process (seconds of CPU beside the runs) at every poll."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("AIRFLOW")})


def _is_paused(dag_id: str) -> bool:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        dag = session.get(DagModel, dag_id)
        return dag is None or bool(dag.is_paused)


def _read_metadata(read: Callable, when_busy):
    """`read(session)` on the metadata DB; `when_busy` while SQLite is busy with a writer (asked again at the next
    poll)."""
    from airflow.utils.session import create_session
    from sqlalchemy.exc import OperationalError

    try:
        with create_session() as session:
            return read(session)
    except OperationalError as err:
        if SQLITE_BUSY in str(err):
            return when_busy
        raise


def _scheduler_alive() -> bool:
    """As `airflow jobs check --job-type SchedulerJob`: a running scheduler whose heartbeat is recent (not known
    while SQLite is busy: taken as alive)."""
    from airflow.jobs.job import Job
    from airflow.utils.state import JobState
    from sqlalchemy import select

    query = select(Job).where(Job.job_type == "SchedulerJob", Job.state == JobState.RUNNING)
    return _read_metadata(lambda session: any(job.is_alive() for job in session.scalars(query)), True)


def _scheduler_starting() -> bool:
    """Whether a scheduler started within SCHEDULER_START_S is running: before its first heartbeat its executor
    preloads the stage libraries (10-40 s here), and it looks dead meanwhile."""
    from airflow.jobs.job import Job
    from airflow.sdk import timezone
    from airflow.utils.state import JobState
    from sqlalchemy import select

    query = select(Job.start_date).where(Job.job_type == "SchedulerJob", Job.state == JobState.RUNNING)
    now = timezone.utcnow()
    return _read_metadata(lambda session: any(
        (now - started).total_seconds() < SCHEDULER_START_S for started in session.scalars(query)), True)


def _scheduler_heard(poll_seconds: float, echo) -> bool:
    """Whether a live scheduler is seen within SCHEDULER_GONE_POLLS polls (one late heartbeat, a busy scheduler loop
    or SQLite's writer, is not yet a scheduler gone, as in the wait below), or, for one that is starting, before
    SCHEDULER_START_S have passed since its start (a backfill right after `make up`)."""
    polls = 0
    while not _scheduler_alive():
        polls += 1
        if polls >= SCHEDULER_GONE_POLLS:
            if not _scheduler_starting():
                return False
            if polls == SCHEDULER_GONE_POLLS:
                echo("waiting for the Airflow scheduler, which is starting (its executor preloads the stage "
                     "libraries before its first heartbeat)")
        time.sleep(poll_seconds)
    return True


def _runs(dag_id: str) -> dict[str, Night]:
    """The DAG's runs by logical date (ISO, UTC); none while SQLite is busy."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    query = select(DagRun.logical_date, DagRun.run_id, DagRun.state).where(DagRun.dag_id == dag_id,
                                                                          DagRun.logical_date.is_not(None))
    found = {}
    for when, run_id, state in _read_metadata(lambda session: session.execute(query).all(), []):
        when = when.astimezone(dt.UTC)
        found[when.isoformat()] = Night(when, run_id, state)
    return found


# `airflow` commands that write, on SQLite: wait this long for the scheduler's write lock (see `_create_paused`)
SQLITE_CONNECT_ARGS = {"timeout": 60}
# polls in a row without a live scheduler (Airflow's own test: a heartbeat within scheduler_health_check_threshold)
SCHEDULER_GONE_POLLS = 3
SCHEDULER_START_S = 180  # a scheduler started this recently and not yet heard is starting, not gone
ANOTHER_BACKFILL = "Another backfill is running"
SQLITE_BUSY = "database is locked"  # SQLite's one writer at a time (the embedded default; PostgreSQL waits)
# the scheduler marks a finished backfill complete every 30 s; one whose create failed before any of its runs was
# stored (SQLite's "database is locked", under load) blocks the DAG's next create until the scheduler drops it, 2
# minutes after it was made (seen: 140 s)
RETRY_S = 180


def _on_sqlite() -> bool:
    from airflow import settings

    return settings.SQL_ALCHEMY_CONN.startswith("sqlite")


def _writer_env(env: dict) -> dict:
    """`env` for an `airflow` command that writes: on SQLite it waits up to a minute for the write lock."""
    if not _on_sqlite():
        return env
    return {**env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.SQLITE_CONNECT_ARGS"}


def _create_paused(dag_id: str, first: dt.date, last: dt.date, env: dict, echo) -> None:
    """Create the backfill and leave the DAG unpaused. On SQLite the DAG is paused while the backfill is created:
    a create that meets the scheduler's write lock can fail at once (SQLite gives up on a lock upgrade without
    waiting), and Airflow then deletes the runs it had just made; a scheduler that had picked them up stops on the
    deleted rows (seen in the suite under load). The scheduler leaves a paused DAG's runs alone."""
    was_paused, env = _is_paused(dag_id), _writer_env(env)
    hold = _on_sqlite() and not was_paused
    if hold:
        _check(_airflow("dags", "pause", dag_id, env=env), f"pausing {dag_id} while its backfill is created")
    try:
        _create(dag_id, first, last, env, echo)
    finally:
        if hold:  # as it was, whether the create worked or not
            _check(_airflow("dags", "unpause", dag_id, env=env), f"unpausing {dag_id}")
    if was_paused:
        _check(_airflow("dags", "unpause", dag_id, env=env), f"unpausing {dag_id}")
        echo(f"unpaused {dag_id}: as on any unpause, Airflow also starts its latest scheduled night (catchup is "
             "off), beside the backfill")


def _create(dag_id: str, first: dt.date, last: dt.date, env: dict, echo) -> None:
    """`airflow backfill create`, tried again while an earlier backfill whose runs have ended is not yet marked
    complete by the scheduler (one open backfill per DAG), or while SQLite is busy with another writer."""
    deadline = time.monotonic() + RETRY_S
    while True:
        done = _airflow("backfill", "create", "--dag-id", dag_id, "--from-date", first.isoformat(),
                        "--to-date", f"{last.isoformat()}T23:59:59+00:00", "--reprocess-behavior", "completed",
                        "--max-active-runs", "1", env=env)
        said = done.stdout + done.stderr
        transient = next((why for why in (ANOTHER_BACKFILL, SQLITE_BUSY) if why in said), None)
        if done.returncode == 0 or transient is None:
            _check(done, f"airflow backfill create for {dag_id}")
            return
        if time.monotonic() > deadline:
            if transient == ANOTHER_BACKFILL:
                raise LeptonError(f"another backfill of {dag_id} is still running (see the DAG's Backfills in the "
                                  "UI); only one backfill per DAG can run at a time")
            _check(done, f"airflow backfill create for {dag_id}")
        echo(f"backfill create: {transient.lower()}; trying again in 5 s")
        time.sleep(5)


def backfill(loaded: LoadedSpec, first: dt.date, last: dt.date, timeout_minutes: float = 720,
             poll_seconds: float = 3, echo=print) -> tuple[list[Night], list[str]]:
    """Backfill the nights in [first, last] and wait for them; (the nights, their report.json paths)."""
    from lepton_tasks.tools.airflow_home import checkout_env

    spec, env = loaded.spec, checkout_env()
    if not spec.schedule:
        raise LeptonError(f"pipeline '{spec.name}' has no schedule: a backfill runs one DAG run per scheduled night")
    if last < first:
        raise LeptonError(f"--to {last} is before --from {first}")
    expected = nights(spec.schedule, first, last)
    if not expected:
        raise LeptonError(f"schedule '{spec.schedule}' has no run dated {first}..{last}")
    _use_metadata_db(env)
    if not _scheduler_heard(poll_seconds, echo):
        raise LeptonError("no Airflow scheduler is running: start the stack with `make up` (a backfill is run by "
                          "the scheduler, as from the UI's Backfill dialog)")
    _create_paused(spec.name, first, last, env, echo)  # a paused DAG runs nothing, backfills included
    echo(f"backfill of {spec.name}: {len(expected)} night(s), {expected[0].date()} .. {expected[-1].date()}")
    deadline, reported, unheard = time.monotonic() + timeout_minutes * 60, set(), 0
    while True:
        runs = _runs(spec.name)
        mine = [runs.get(tick.isoformat(), Night(tick)) for tick in expected]
        pending = ", ".join(str(n.logical_date.date()) for n in mine if n.state not in TERMINAL)
        unheard = 0 if _scheduler_alive() else unheard + 1
        if pending and unheard >= SCHEDULER_GONE_POLLS:  # else the wait would last until its timeout
            raise LeptonError(f"the Airflow scheduler stopped during the backfill of {spec.name} (pending: "
                              f"{pending}): see its log, start it again and rerun the same backfill (nights that "
                              "finished are rerun idempotently)")
        for night in mine:
            if night.state in TERMINAL and night.logical_date not in reported:
                reported.add(night.logical_date)
                echo(f"  {night.logical_date.date()}  {night.state:<8} {night.run_id}")
        if all(n.state in TERMINAL for n in mine):
            break
        if time.monotonic() > deadline:
            raise LeptonError(f"backfill of {spec.name} not finished after {timeout_minutes:g} min "
                              f"(pending: {pending})")
        time.sleep(poll_seconds)
    root = Settings.from_env().data_root
    return mine, [str(RunPaths.of(root, spec.name, n.run_id).report) for n in mine]
