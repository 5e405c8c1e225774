"""Typed errors: each names the file, column or param at fault."""

from __future__ import annotations


class LeptonError(Exception):
    """Base class for every failure Lepton raises on purpose.

    Most say the input is wrong, which a retry cannot fix: Airflow fails them at once. Those marked
    `retryable` (a service that is down) are left to Airflow's retries.
    """

    retryable = False


class BadParam(LeptonError):
    """A run parameter is missing, of the wrong type, or out of bounds."""


class BadSource(LeptonError):
    """The source cannot be read: missing, empty, corrupt or unsupported."""


class StoreUnavailable(LeptonError):
    """An object store (or other remote filesystem) did not answer; the message names it. Airflow's retry tries
    again."""

    retryable = True


class StoreAccessDenied(LeptonError):
    """An object store refused the credentials; the message names the setting that holds them, never its value."""


class WarehouseUnavailable(LeptonError):
    """A database behind a SQL source did not answer; the message names its Airflow connection (never the
    password). Airflow's retry tries again."""

    retryable = True


class WarehouseAccessDenied(LeptonError):
    """A database refused the login of a SQL source's Airflow connection; the message names the connection."""


class ValidationFailed(LeptonError):
    """The data failed its expectation suite."""


class ShardError(LeptonError):
    """The data cannot be split as asked (too few rows for the shards, say)."""


class TrainingError(LeptonError):
    """A shard's training failed."""


class IntegrityError(LeptonError):
    """An artifact does not match the checksum its manifest recorded."""


class ClusterError(LeptonError):
    """The Dask cluster failed under a stage (scheduler lost or restarted, no worker left) and did not come back
    in time; Airflow's retry resumes from what was written."""

    retryable = True


class RegistryError(LeptonError):
    """MLflow was unreachable, or refused or lost part of the registration."""

    retryable = True


class SpecError(LeptonError):
    """A pipeline spec is unreadable or invalid; the message names the file and each field at fault."""
