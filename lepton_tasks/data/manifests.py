"""What each stage hands the next: typed manifests (paths, counts, checksums, figures; never data).

A stage returns one of these; the orchestration layer turns it into the plain mapping an XCom holds, and back, at
one boundary (`to_dict` / `from_dict`), so the stages and the code between them read typed fields. Each says which
of its fields the stage summary and the run report show (`summary`, `REPORT_FIGURES`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Manifest")


class Manifest:
    """A stage's output as a dataclass: `to_dict` for XCom and JSON, `from_dict` to read it back, nested records
    (a `ShardInfo`, a `Variant`, ...) rebuilt by their declared types."""

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ()  # fields of the summary that `report.json` lifts into `metrics`
    REPORT_PREFIX: ClassVar[str] = ""  # how they are named there: "validate.passed", or plain "rows"

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[M], raw: dict) -> M:
        return _build(cls, raw)

    def summary(self) -> dict:
        """The figures the stage summary (and the task log) shows; the whole manifest unless a stage says less."""
        return self.to_dict()


def pick(record: Any, names: tuple[str, ...]) -> dict:
    """The named fields of a manifest or record, as a mapping (what a summary, an event or a table shows)."""
    return {name: getattr(record, name) for name in names}


def _build(cls: type, raw: dict) -> Any:
    hints = _hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{name: _value(hints[name], value) for name, value in raw.items()})


@cache
def _hints(cls: type) -> dict[str, Any]:
    declared = typing.get_type_hints(cls)
    return {f.name: declared[f.name] for f in dataclasses.fields(cls)}


def _value(hint: Any, value: Any) -> Any:
    """`value` (plain JSON data) as the declared type: dataclasses rebuilt, lists of them too; the rest as is."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value) if len(inner) == 1 else value
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_value(args[0], item) for item in value]
    return value


@dataclass(frozen=True)
class ModelShape:
    """Everything needed to rebuild a model before loading its weights."""

    kind: str  # "mlp", "cnn", or a pipeline's own model class, "package.module:ClassName"
    in_features: int
    out_features: int  # classes, or 1 for regression
    hidden: int
    task: str = "classification"
    target_mean: float = 0.0  # regression: the model predicts in the target's units, learning on a unit scale
    target_std: float = 1.0
    kwargs: dict = field(default_factory=dict)  # an own model class's keyword arguments (the spec's model_kwargs)


def own_model_params(kind: str, kwargs: dict) -> dict[str, str]:
    """A pipeline's own model class and kwargs as MLflow run params (strings), what a registered version is rebuilt
    from (`tensors.version_shape`) and a warm start compared on; {} for a built-in kind."""
    if ":" not in kind:
        return {}
    return {"model_class": kind, "model_kwargs": json.dumps(kwargs, sort_keys=True)}


@dataclass
class WaitManifest(Manifest):
    """Every day of the run's window is there: the run's date and each day's URI."""

    ds: str
    days: list[dict]


@dataclass
class IngestManifest(Manifest):
    """What the ingest stage wrote: the stage folder, its parts and their checksums."""

    source_uri: str
    source_files: list[str]
    source_sha256: str
    stage_dir: str
    parts: list[str]
    rows: int
    columns: dict[str, str]  # name -> Arrow type
    sha256: str  # over the stage's Parquet parts
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # per day of a date-templated source ({day: None} otherwise): its URI and files, each with rows and sha256
    window: list[dict] = field(default_factory=list)

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("rows",)

    def summary(self) -> dict:
        return {"rows": self.rows, "files": len(self.source_files), "sha256": self.sha256,
                "source_sha256": self.source_sha256, "window": self.window}


@dataclass
class Failure:
    """One failed expectation."""

    expectation: str
    column: str | None
    unexpected_count: int | None
    sample: list = field(default_factory=list)
    rows: list[int] | None = field(default=None, repr=False)  # failing row numbers (row-level expectations)

    def __str__(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        count = ""
        if self.unexpected_count:
            count = f": {self.unexpected_count} unexpected value(s), e.g. {self.sample[:3]}"
        return f"{self.expectation}{where}{count}"


@dataclass
class ValidationManifest(Manifest):
    """Outcome of the validate stage."""

    suite: str
    success: bool
    evaluated: int
    passed: int
    failed: int
    failures: list[Failure]
    result_path: str
    docs_index: str
    parts: list[str] = field(default_factory=list)  # what the next stages read: the stage, or its clean rows
    rows: int = 0
    quarantined_rows: int = 0
    quarantine_path: str | None = None
    partitions: int = 1  # 1: validated in memory; more: partition by partition on Dask

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("passed", "failed", "quarantined_rows")
    REPORT_PREFIX: ClassVar[str] = "validate."

    def summary(self) -> dict:
        return pick(self, ("suite", "evaluated", "passed", "failed", "docs_index", "quarantined_rows",
                           "quarantine_path", "partitions"))

    def asset_event(self) -> dict:
        """What the validated-data Asset event carries: where the rows are and how they fared."""
        return pick(self, ("suite", "rows", "passed", "failed", "quarantined_rows", "parts"))


@dataclass
class DriftManifest(Manifest):
    stage_dir: str
    profile_path: str  # this run's profile: the reference for the runs after it, if it becomes champion
    reference: dict | None  # {model_version, mlflow_run_id} of the champion compared with; None: nothing to compare
    threshold: float
    action: str
    columns: dict[str, float] = field(default_factory=dict)  # column (label included) -> PSI
    label: str = ""
    max_psi: float | None = None
    worst: str | None = None
    alarm: bool = False
    report_path: str | None = None
    note: str = ""
    champion: dict | None = None  # the champion snapshot this run took (`ChampionSnapshot`); None: none usable
    champion_unusable: str | None = None  # why a champion that exists could not be read (the run starts afresh)

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("max_psi",)
    REPORT_PREFIX: ClassVar[str] = "drift."

    def summary(self) -> dict:
        return pick(self, ("max_psi", "worst", "threshold", "action", "alarm", "columns", "reference",
                           "report_path", "note", "champion_unusable"))


@dataclass
class ShardInfo:
    """One shard (or the held-out split): its files, size, label histogram and checksum."""

    name: str
    files: list[str]
    rows: int
    label_histogram: dict[str, int]
    sha256: str
    keys: list[str] | None = None  # with shard_by: the column's values this shard holds


@dataclass
class WarmStart:
    """Where round 1 starts: the champion's weights and encoder when it fits this run, else the seeded init, and
    why (decided by `lepton_tasks.ml.champion.warm_start`)."""

    init_from: str  # the run's param: "champion" or "scratch"
    reason: str
    version: str | None = None  # the champion version started from; None: from scratch
    weights: str | None = None  # its checkpoint, in this run's snapshot
    encoder: str | None = None  # its encoder (JSON), which the shards are encoded with


@dataclass
class ShardManifest(Manifest):
    """The shard stage's output."""

    stage_dir: str
    seed: int
    eval_fraction: float
    label_column: str
    feature_columns: list[str]
    shards: list[ShardInfo]
    eval: ShardInfo
    encoder: dict  # features.Encoder, fitted on the training rows (or the champion's, on a warm start)
    warm_start: WarmStart | None = None
    shard_by: str | None = None  # the column shards follow; None: stratified by label
    select: ShardInfo | None = None  # with a select_fraction: the selection split (neither trained on nor eval)

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("shard_rows", "eval_rows")

    def summary(self) -> dict:
        return {"shard_rows": {s.name: s.rows for s in self.shards}, "eval_rows": self.eval.rows,
                "warm_start": asdict(self.warm_start) if self.warm_start else None}


@dataclass
class TrainManifest(Manifest):
    """Every round's shard checkpoints (the last round is what `merge` averages)."""

    stage_dir: str
    shape: ModelShape
    init: dict
    rounds: list[list[dict]] = field(default_factory=list)
    dashboard_link: str | None = None  # the Dask dashboard of the cluster that trained it
    strategy: str = "fedavg"
    merged: list[dict] = field(default_factory=list)  # {"path", "sha256"}: the global model after each round

    @property
    def final_round(self) -> list[dict]:
        """The last round's shard checkpoints: what `merge` averages."""
        return self.rounds[-1]

    def summary(self) -> dict:
        last = self.rounds[-1]
        return {"rounds": len(self.rounds), "strategy": self.strategy,
                "final_loss": {c["shard"]: c["epochs"][-1]["loss"] if c["epochs"] else None for c in last},
                "resumed": sum(c["resumed"] for r in self.rounds for c in r),
                "dp_epsilon": {c["shard"]: c["epsilon"] for c in last if c.get("epsilon") is not None} or None}


@dataclass
class MergeManifest(Manifest):
    """The merged model, how it and each shard model score on the held-out split, and the run's plots."""

    merged_path: str
    merged_sha256: str
    rounds: int
    eval_rows: int
    metric: str  # the one models are compared on
    merged_metrics: dict[str, float]
    shard_metrics: dict[str, dict[str, float]]
    round_scores: list[float] = field(default_factory=list)  # the merged model's metric after each round
    plots: list[str] = field(default_factory=list)
    strategy: str = "fedavg"
    soup: list[str] | None = None  # a strategy that chooses (greedy_soup): the models it chose, best first

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("metric", "merged_metrics", "shard_metrics")

    @property
    def merged_score(self) -> float:
        return self.merged_metrics[self.metric]

    def summary(self) -> dict:
        return pick(self, ("metric", "merged_metrics", "round_scores", "shard_metrics", "strategy", "soup"))


@dataclass
class Variant:
    """One compressed form of the merged model and how it scores."""

    name: str
    path: str
    score: float  # the pipeline's metric
    metrics: dict[str, float]
    bytes: int
    deflated_bytes: int
    latency_p50_ms: float  # a single row
    latency_p99_ms: float
    batch_latency_p50_ms: float  # a batch of BATCH_ROWS rows
    within_tolerance: bool = False
    not_slower: bool = True  # than the fp32 ONNX export, single row and batch (within LATENCY_NOISE)
    verdict: str = ""  # why it was or was not chosen


@dataclass
class CompressManifest(Manifest):
    """All variants, the reference (fp32 PyTorch) and the chosen one."""

    reference: Variant
    variants: list[Variant]
    chosen: str
    chosen_path: str
    chosen_sha256: str
    metric: str
    tolerance: float
    sparsity: float
    plots: list[str] = field(default_factory=list)
    unmade: dict[str, str] = field(default_factory=dict)  # variant -> why it could not be made (an own model's op)

    REPORT_FIGURES: ClassVar[tuple[str, ...]] = ("chosen", "variants", "unmade")
    VARIANT_FIGURES: ClassVar[tuple[str, ...]] = ("score", "metrics", "bytes", "latency_p50_ms", "latency_p99_ms",
                                                 "batch_latency_p50_ms", "verdict")

    def tradeoff_table(self) -> dict[str, list]:
        """As MLflow's table shape (a column each): why each variant was or was not chosen."""
        variants = (self.reference, *self.variants)
        columns = ("name", "score", "bytes", "deflated_bytes", "latency_p50_ms", "latency_p99_ms",
                   "batch_latency_p50_ms", "within_tolerance", "not_slower", "verdict")
        table = {column: [getattr(v, column) for v in variants] for column in columns}
        table["verdict"][0] = "the merged model (reference)"
        return table

    def summary(self) -> dict:
        return {"chosen": self.chosen,
                "variants": {v.name: pick(v, self.VARIANT_FIGURES) for v in (self.reference, *self.variants)}}


@dataclass
class RegisterManifest(Manifest):
    tracking_uri: str
    experiment_id: str
    run_id: str
    model_name: str
    model_version: str
    aliases: list[str] = field(default_factory=list)
    champion_before: str | None = None
    promotion: dict = field(default_factory=dict)  # promotion.json: the comparison, its outcome and reason

    def summary(self) -> dict:
        return {"mlflow": self.to_dict()}


@dataclass
class ScoreManifest(Manifest):
    model_name: str
    model_version: str
    mlflow_run_id: str
    onnx_file: str
    rows: int
    predictions_path: str
    metrics: dict[str, float]  # when the batch carries the target column
    sources: list[str] = field(default_factory=list)
    distribution: dict[str, float] = field(default_factory=dict)  # share per class, or quantiles of the values
    scoring_run_id: str | None = None  # the MLflow run this scoring is logged in (the pipeline's experiment)

