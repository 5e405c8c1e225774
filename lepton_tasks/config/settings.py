"""Typed configuration, declared once and read everywhere.

Three layers:
- `RunParams`: what a person may change per run (Airflow UI form, `-c` conf, CLI). Bounds live here only;
  the DAG's `Param`s are generated from this model, so the form and the code can never disagree.
- `PipelineSpec` (in `specs`): what a pipeline is, one YAML file each; its values are the params' defaults.
- `Settings`: where things live on this machine, read from the environment once, at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lepton_tasks.core.errors import BadParam
from lepton_tasks.core.store import WorkArea
from lepton_tasks.data.windows import check_template
from lepton_tasks.ml.strategies import STRATEGIES

REPO_ROOT = Path(__file__).resolve().parents[2]  # lepton_tasks/config/settings.py -> the checkout
EXPECTATIONS_DIR = REPO_ROOT / "expectations"
PLUGINS_DIR = REPO_ROOT / "plugins"  # Airflow's plugins folder (AIRFLOW_HOME is the checkout); own models too
PIPELINES_DIR = REPO_ROOT / "dags" / "pipelines"  # one YAML spec per pipeline; LEPTON_PIPELINES_DIR overrides
WAREHOUSE_CONN_ID = "lepton_warehouse"  # the bundled warehouse example's Airflow connection

ModelKind = Literal["mlp", "cnn"]
MODEL_CLASS_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"  # an own model
InitFrom = Literal["scratch", "champion"]
DriftAction = Literal["fail", "warn"]
# the merge strategies, one module each in lepton_tasks.ml.strategies: names, help and local optimizers come from there
MergeStrategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
LocalOptimizer = Literal["auto", "sgd", "adam"]
TemplatedUri = Annotated[str, AfterValidator(check_template)]  # may hold {ds}, ...; other placeholders refused


class RunParams(BaseModel):
    """Per-run knobs; every field becomes a typed, bounded Airflow `Param`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_uri: TemplatedUri = Field(
        title="Source URI",
        description="CSV or Parquet file, folder or glob; local path or any fsspec URI. "
        "A relative path is read under the Lepton data root.",
        min_length=1,
    )
    window_days: int = Field(
        1, ge=1, le=366, title="Window (days)",
        description="Days of data a run reads, ending with its date (`ds`), when the source URI holds {ds}, "
        "{ds_nodash}, {yyyy}, {mm} or {dd}.",
    )
    wait_timeout_minutes: float = Field(
        0, ge=0, le=7 * 24 * 60, title="Wait for data (minutes)",
        description="How long the run waits (deferred, in the triggerer) for every day of its window to land; "
        "0 fails at once naming the missing day(s).",
    )
    wait_poke_seconds: float = Field(60, ge=1, le=3600, title="Wait poke interval (s)",
                                     description="How often a waiting run looks for its files.")
    num_shards: int = Field(4, ge=1, le=64, title="Shards", description="Parquet shards = models trained in parallel.")
    local_epochs: int = Field(5, ge=1, le=500, title="Local epochs", description="Epochs each shard trains per round.")
    merge_rounds: int = Field(
        8, ge=1, le=50, title="Merge rounds",
        description="Merge rounds; each round restarts every shard from the merged model.",
    )
    shard_by: str | None = Field(
        None, min_length=1, title="Shard by column",
        description="One shard per value of this column (values hashed into 'Shards' buckets when there are more), "
        "natural sizes, no stratification: data that lives apart (per site, region, customer). Empty: rows dealt "
        "to 'Shards' shards stratified by label.",
    )
    merge_strategy: MergeStrategy = Field(
        "fedavg", title="Merge strategy",
        description="; ".join(f"{name}: {strategy.summary} ({strategy.paper})" for name, strategy in STRATEGIES.items())
        + ".",
    )
    fedprox_mu: float = Field(0.01, ge=0, le=100, title="FedProx mu",
                              description="Weight of FedProx's proximal term mu/2 * ||w - w_global||^2.")
    server_learning_rate: float | None = Field(
        None, gt=0, le=10, title="Server learning rate",
        description="The server optimizer's step size; empty: " + ", ".join(
            f"{s.default_server_learning_rate} for {name}" for name, s in STRATEGIES.items()
            if s.default_server_learning_rate is not None) + ".")
    server_momentum: float = Field(0.9, ge=0, lt=1, title="Server momentum",
                                   description="fedavgm's momentum, fedadam's beta1.")
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, title="Trim fraction",
        description="trimmed_mean drops floor(fraction x shards) values at each end of every coordinate.")
    dp_epsilon: float | None = Field(
        None, gt=0, le=1000, title="DP epsilon per shard",
        description="Train every shard with DP-SGD (Opacus) to this privacy budget over all rounds, delta = 1/rows "
        "of the shard; empty: off.")
    dp_max_grad_norm: float = Field(1.0, gt=0, le=1000, title="DP clipping norm",
                                    description="Per-sample gradient norm DP-SGD clips to.")
    learning_rate: float = Field(0.01, gt=0, le=1, title="Learning rate",
                                 description="The local optimizer's learning rate (SGD usually wants more than Adam: "
                                 "0.05-0.1).")
    local_optimizer: LocalOptimizer = Field(
        "auto", title="Local optimizer",
        description="How each shard trains locally. `auto`: the optimizer of the merge strategy's paper where its "
        "server step or local correction assumes one (SGD for " + ", ".join(
            name for name, s in STRATEGIES.items() if s.paper_local_optimizer == "sgd") + "), else Adam; `sgd` "
        "(with 'Local momentum') or `adam` for every strategy.")
    local_momentum: float = Field(0.0, ge=0, lt=1, title="Local momentum",
                                  description="Momentum of the local SGD (the papers' SGD has none); unused by Adam.")
    batch_size: int = Field(64, ge=1, le=65536, title="Batch size", description="Mini-batch size per shard.")
    model_kind: ModelKind = Field(
        "mlp", title="Model kind", description="`mlp`, or `cnn` (a 1-D conv net over the features in order)."
    )
    hidden_size: int = Field(64, ge=4, le=4096, title="Hidden size", description="MLP width or CNN channels.")
    compression_tolerance: float = Field(
        0.01,
        ge=0,
        title="Compression tolerance",
        description="Largest worsening of the pipeline's metric on held-out data that a compressed variant may "
        "have, in the metric's own units (accuracy: 0.01 = 1 point; MAE: target units).",
    )
    prune_sparsity: float = Field(
        0.5, ge=0, lt=1, title="Pruning sparsity", description="Fraction of weights zeroed by global magnitude pruning."
    )
    eval_fraction: float = Field(
        0.2, gt=0, lt=1, title="Held-out fraction", description="Rows kept out of every shard for evaluation."
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, title="Seed", description="Seeds the split, the init and the shuffles.")
    init_from: InitFrom = Field(
        "scratch", title="Start from",
        description="`champion`: round 1 starts from the champion's weights and encoder (scratch where its "
        "columns no longer fit); `scratch`: a fresh initialisation.",
    )
    drift_max: float = Field(
        0.25, ge=0, title="Drift threshold (PSI)",
        description="Largest population stability index of any feature or the label, against the champion's "
        "training data, before `drift_action` applies (0.1: moderate, 0.25: major shift).",
    )
    drift_action: DriftAction = Field(
        "warn", title="On drift", description="`fail`: stop before training; `warn`: notify and go on.")
    replace_unusable_champion: bool = Field(
        False, title="Replace an unusable champion",
        description="When the champion cannot be re-scored on this run's held-out rows (its files are gone, or it "
        "was trained on other columns), promote this run's model in its place (promotion outcome "
        "`replaced_unusable`). Off: such a champion stays, and no model is promoted without a comparison.",
    )
    quarantine_max_fraction: float = Field(
        0.0, ge=0, le=0.5, title="Quarantine up to",
        description="Rows failing row-level expectations go to a run-scoped quarantine file (with reasons) and the "
        "run goes on while they are at most this share of the data; 0 stops the run on any failed expectation.",
    )

    @model_validator(mode="after")
    def _private_strategy(self) -> RunParams:
        if self.dp_epsilon is not None and STRATEGIES[self.merge_strategy].changes_local_training:
            raise ValueError(f"'dp_epsilon' with 'merge_strategy' {self.merge_strategy!r}: DP-SGD privatises the "
                             "per-sample gradients, and this strategy's local correction would bypass it; use one of "
                             f"{', '.join(n for n, s in STRATEGIES.items() if not s.changes_local_training)}")
        return self

    @property
    def optimizer(self) -> str:
        """The local optimizer this run trains with: `local_optimizer`, `auto` resolved for the merge strategy."""
        if self.local_optimizer != "auto":
            return self.local_optimizer
        return STRATEGIES[self.merge_strategy].paper_local_optimizer or "adam"

    def digest(self) -> str:
        """Short content hash, used to tell whether a checkpoint was made with these params."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def parse_params(raw: dict[str, Any] | None, defaults: RunParams | None = None) -> RunParams:
    """Validate raw params (from Airflow or a CLI) over `defaults`; the error names each bad param."""
    try:
        return RunParams.model_validate({**(defaults.model_dump() if defaults else {}), **(raw or {})})
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise BadParam(problems) from None


def _problem(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    return f"param '{'.'.join(map(str, error['loc']))}': {message}" if error["loc"] else message


def airflow_param_specs(defaults: RunParams) -> dict[str, dict[str, Any]]:
    """Keyword arguments for one `airflow.sdk.Param` per field (JSON-schema typed, bounded, described)."""
    values = defaults.model_dump()
    schema = RunParams.model_json_schema()["properties"]
    specs = {}
    for name, prop in schema.items():
        if "anyOf" in prop:  # an optional field: its value's schema, and null allowed (an empty form field)
            value = next(p for p in prop["anyOf"] if p.get("type") != "null")
            prop = {**prop, **value, "type": [value["type"], "null"]}
        spec = {k: prop[k] for k in ("type", "title", "description", "enum", "minimum", "maximum") if k in prop}
        for exclusive in ("exclusiveMinimum", "exclusiveMaximum"):
            if exclusive in prop:
                spec[exclusive] = prop[exclusive]
        if "minLength" in prop:
            spec["minLength"] = prop["minLength"]
        specs[name] = {"default": values[name], **spec}
    return specs


# above this decoded size a stage is validated partition by partition on the run's cluster: in one process
# its float64 value checks would hold it about three times over
DEFAULT_VALIDATE_MEMORY_BYTES = 512 << 20
DEFAULT_DASK_RECOVERY_S = 180.0


@dataclass(frozen=True)
class Settings:
    """Machine-level locations and services. Read with `Settings.from_env()` inside a task, never at import."""

    data_root: Path  # run folders, landing data, local MLflow store (this host's copy, if LEPTON_DATA_ROOT is a store)
    mlflow_tracking_uri: str | None  # None: the Airflow connection, else a local SQLite store under data_root
    dask_address: str | None  # None: the Airflow connection `dask_default`, else a local cluster
    dask_workers: int | None  # None: one per shard, capped by cores (CPU) or one per GPU
    # A stage whose decoded size is over this is validated partition by partition on Dask, not in one frame
    validate_memory_bytes: int = DEFAULT_VALIDATE_MEMORY_BYTES
    # How long a stage waits for a failed Dask cluster (scheduler restarted, every worker gone) to come back
    # before it fails with a retryable error (Airflow's retry then resumes from what was written)
    dask_recovery_s: float = DEFAULT_DASK_RECOVERY_S
    # Threads each shard trains with: part of the determinism policy (bit-equal weights for a fixed count, see
    # `train`); Dask's parallelism is across shards
    train_threads: int = 1
    data_store: str | None = None  # LEPTON_DATA_ROOT where it is an object store's URL (data_root: this host's copy)

    @classmethod
    def from_env(cls) -> Settings:
        workers, area = os.environ.get("LEPTON_DASK_WORKERS"), WorkArea.from_env()
        return cls(
            data_root=area.local,
            data_store=area.store,
            mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            dask_address=os.environ.get("LEPTON_DASK_ADDRESS"),
            dask_workers=int(workers) if workers else None,
            validate_memory_bytes=int(os.environ.get("LEPTON_VALIDATE_MEMORY_BYTES", DEFAULT_VALIDATE_MEMORY_BYTES)),
            dask_recovery_s=float(os.environ.get("LEPTON_DASK_RECOVERY_S", DEFAULT_DASK_RECOVERY_S)),
            train_threads=int(os.environ.get("LEPTON_TRAIN_THREADS", 1)),
        )

    def local_warehouse_env(self) -> dict[str, str]:
        """The warehouse example's Airflow connection (`WAREHOUSE_CONN_ID`) where nothing defines it: a SQLite
        file under the data root (`make up` defines it on its PostgreSQL)."""
        connection = json.dumps({"conn_type": "sqlite", "host": str(self.data_root / "warehouse.db")})
        return {f"AIRFLOW_CONN_{WAREHOUSE_CONN_ID.upper()}": connection}

    def local_mlflow_uri(self) -> str:
        return f"sqlite:///{self.data_root / 'mlflow.db'}"

    def mlflow_artifact_root(self) -> str:
        """Where a tracking database without a server keeps artifacts: beside the runs, on the store if they are."""
        if self.data_store:
            return f"{self.data_store}/mlartifacts"
        return (self.data_root / "mlartifacts").as_uri()


PRELOADING_EXECUTOR = "lepton_tasks.orchestration.executor.PreloadingLocalExecutor"  # airflow.cfg's [core] executor


def stable_json(value: Any) -> str:
    """JSON with sorted keys: the form that checksums and digests are taken of."""
    return json.dumps(value, sort_keys=True, default=str)


def redact_uri(uri: str) -> str:
    """The URI without its password, for logs, reports and XCom."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
