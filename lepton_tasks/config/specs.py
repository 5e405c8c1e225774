"""Pipeline specs: one YAML file per pipeline, validated by a typed model when it is loaded.

A spec says what a pipeline is (source, columns, target, preprocessing, suite, schedule, names) and holds the
defaults of its run params. The run params' bounds are declared once, in `config.RunParams`; the spec's
`training`, `merge` and `compression` sections are built from those same fields, so a spec can never hold a
value the Airflow form would refuse.

    name: house_prices
    source: {uri: "landing/house_prices/*.csv"}   # or {conn_id: warehouse, table: sales, partition_column: day}
    features: {area_m2: numeric, neighbourhood: categorical}
    target: {column: price_k, task: regression}
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from lepton_tasks.config.settings import (
    EXPECTATIONS_DIR,
    MODEL_CLASS_PATH,
    PIPELINES_DIR,
    DriftAction,
    RunParams,
    TemplatedUri,
)
from lepton_tasks.core.errors import SpecError
from lepton_tasks.data.warehouse import IDENTIFIER, QUERY_PLACEHOLDERS, TABLE_NAME, SqlSource, check_query

FeatureType = Literal["numeric", "categorical"]
TaskKind = Literal["classification", "regression"]
SourceFormat = Literal["csv", "parquet", "jsonl"]
SCHEDULE_PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
METRICS = {"classification": ("accuracy",), "regression": ("r2", "mae", "rmse", "mse")}
PARAM_SECTIONS = {
    "training": ("num_shards", "shard_by", "model_kind", "hidden_size", "local_epochs", "learning_rate",
                 "local_optimizer", "local_momentum", "batch_size", "eval_fraction", "seed", "init_from", "dp_epsilon",
                 "dp_max_grad_norm"),
    "merge": ("merge_rounds", "merge_strategy", "fedprox_mu", "server_learning_rate", "server_momentum",
              "trim_fraction"),
    "compression": ("prune_sparsity", "compression_tolerance"),
    "validation": ("quarantine_max_fraction",),
}


def check_schedule(value: str | None) -> str | None:
    from croniter import croniter

    if value is None or value in SCHEDULE_PRESETS or croniter.is_valid(value):
        return value
    raise ValueError(f"'{value}' is neither a cron expression nor one of {', '.join(SCHEDULE_PRESETS)}")


Schedule = Annotated[str | None, AfterValidator(check_schedule)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _params_section(name: str, fields: tuple[str, ...]) -> type[BaseModel]:
    """A model holding some RunParams fields with their types, bounds and defaults."""
    return create_model(name, __base__=_Strict,
                        **{f: (RunParams.model_fields[f].annotation, RunParams.model_fields[f]) for f in fields})


_TrainingParams = _params_section("_TrainingParams", PARAM_SECTIONS["training"])


class TrainingSection(_TrainingParams):
    model: str | None = Field(None, pattern=MODEL_CLASS_PATH,
                              description="The pipeline's own torch.nn.Module, 'package.module:ClassName' (see "
                              "lepton_tasks.ml.models for the contract); replaces model_kind and hidden_size.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `model`.")

    @model_validator(mode="after")
    def _kwargs_need_a_model(self) -> TrainingSection:
        if self.model_kwargs and self.model is None:
            raise ValueError("training.model_kwargs is for a pipeline's own model: set training.model too")
        return self


MergeSection = _params_section("MergeSection", PARAM_SECTIONS["merge"])
ValidationSection = _params_section("ValidationSection", PARAM_SECTIONS["validation"])
_CompressionParams = _params_section("_CompressionParams", PARAM_SECTIONS["compression"])


class CompressionSection(_CompressionParams):
    metric: str | None = Field(None, description="Metric the tolerance is in; default accuracy or r2.")


class WaitSection(_Strict):
    timeout_minutes: float = RunParams.model_fields["wait_timeout_minutes"]
    poke_seconds: float = RunParams.model_fields["wait_poke_seconds"]


class SourceSection(_Strict):
    """Files (`uri`), or a SQL table or query through an Airflow connection (`conn_id` with `table` or `query`)."""

    uri: TemplatedUri | None = Field(None, min_length=1, description="File, folder or glob; local path or any fsspec "
                                     "URI; may hold {ds}, {ds_nodash}, {yyyy}, {mm}, {dd} (the run's date).")
    format: SourceFormat | None = Field(None, description="csv, parquet or jsonl; default: each file's extension.")
    conn_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                                description="Airflow connection of the database a SQL source reads.")
    table: str | None = Field(None, pattern=TABLE_NAME, description="Table (or schema.table) a SQL source reads.")
    partition_column: str | None = Field(None, pattern=rf"^{IDENTIFIER}$", description="The table's date column: "
                                         "a run reads the rows of its window's days.")
    query: Annotated[str, AfterValidator(check_query)] | None = Field(
        None, min_length=1, description="SELECT a SQL source reads; may hold " + ", ".join(
            "{" + p + "}" for p in QUERY_PLACEHOLDERS) + " (bound as parameters; the window is [window_start, "
        "next_ds)). End it with ORDER BY a key, so that a retry reads the rows in the same order.")
    window_days: int = RunParams.model_fields["window_days"]
    wait: WaitSection = Field(default_factory=WaitSection)

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSection:
        if (self.uri is None) == (self.conn_id is None):
            raise ValueError("a source is either files ('uri') or a SQL table or query ('conn_id' with 'table' or "
                             "'query'): set one of 'uri' and 'conn_id'")
        if self.uri is not None:
            if extra := [f for f in ("table", "query", "partition_column") if getattr(self, f) is not None]:
                raise ValueError(f"{', '.join(extra)} belong(s) to a SQL source ('conn_id'), not to 'uri'")
        elif (self.table is None) == (self.query is None):
            raise ValueError("a SQL source reads either a 'table' or a 'query': set one of them")
        elif self.format is not None:
            raise ValueError("'format' is for files; a SQL source has none")
        elif self.partition_column is not None and self.table is None:
            raise ValueError("'partition_column' is for a 'table'; a query filters its window itself with "
                             "{window_start} and {next_ds}")
        return self

    @property
    def sql(self) -> SqlSource | None:
        """The SQL source, or None for files."""
        if self.conn_id is None:
            return None
        return SqlSource(self.conn_id, self.table, self.query, self.partition_column)

    @property
    def run_uri(self) -> str:
        """What the run param `source_uri` holds by default: the files' URI, or `sql://CONN_ID/TABLE`."""
        return self.uri if self.sql is None else self.sql.uri


class DriftSection(_Strict):
    max: float = RunParams.model_fields["drift_max"]
    action: DriftAction = RunParams.model_fields["drift_action"]


NotifyEvent = Literal["failure", "champion_change", "drift"]


class EmailSection(_Strict):
    conn_id: str = Field("smtp_default", description="Airflow SMTP connection.")
    to: list[str] = Field(min_length=1)
    from_email: str = "lepton@localhost"


class WebhookSection(_Strict):
    conn_id: str = Field(description="Airflow HTTP connection (host, port, schema; login/password for auth).")
    endpoint: str = Field("", description="Path under the connection's base URL.")


class NotifySection(_Strict):
    """Who hears about a run: Airflow notifiers, on the events listed."""

    on: list[NotifyEvent] = Field(default_factory=lambda: ["failure", "champion_change", "drift"])
    email: EmailSection | None = None
    webhook: WebhookSection | None = None


class PromotionSection(_Strict):
    """Who moves `champion` once a candidate passes the automatic gate: the run itself (`auto`), or a person
    (`required`: Airflow's Required Actions page, in the DAG NAME_approval; a timeout rejects)."""

    approval: Literal["auto", "required"] = "auto"
    timeout_hours: float = Field(24, gt=0, le=24 * 30, description="How long a candidate waits for a decision.")


class ScoreSection(_Strict):
    """A consumer DAG NAME_score: scores each night's data with the champion (on its Asset and schedule)."""

    uri: TemplatedUri = Field(min_length=1, description="The rows to score; templated like source.uri.")
    schedule: Schedule = Field(None, description="Cron or preset; also runs whenever the champion changes.")
    window_days: int = RunParams.model_fields["window_days"]


class TargetSection(_Strict):
    column: str = Field(min_length=1)
    task: TaskKind = "classification"
    classes: list[int | str] | None = Field(None, description="Every label, for classification.")


class PreprocessingSection(_Strict):
    standardize: bool = Field(True, description="Scale numeric features to zero mean, unit variance.")
    one_hot_max_categories: int = Field(20, ge=2, le=1000, description="Categories kept per column; others "
                                        "share one '__other__' column.")
    fill_numeric: Literal["mean", "zero"] = "mean"
    fill_categorical: Literal["missing", "most_frequent"] = "missing"
    fill_values: dict[str, float | str] = Field(default_factory=dict, description="Per-column constant fills.")


class MlflowSection(_Strict):
    experiment: str | None = None  # default: the pipeline's name
    registered_model: str | None = None  # default: the name with '-' for '_'


class PipelineSpec(_Strict):
    """One pipeline: what it reads, checks, learns and where it registers; defaults for every run param."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,199}$", description="The DAG id.")
    description: str = ""
    owner: str = Field("lepton", min_length=1)
    tags: list[str] = Field(default_factory=list)
    schedule: Schedule = Field(None, description="Cron expression or preset (@daily, ...); null: manual only.")
    source: SourceSection
    features: dict[str, FeatureType] = Field(min_length=1)
    target: TargetSection
    preprocessing: PreprocessingSection = Field(default_factory=PreprocessingSection)
    expectations: str | None = Field(None, description="Suite file in expectations/; default NAME.json.")
    validation: ValidationSection = Field(default_factory=ValidationSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    merge: MergeSection = Field(default_factory=MergeSection)
    compression: CompressionSection = Field(default_factory=CompressionSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    drift: DriftSection = Field(default_factory=DriftSection)
    promotion: PromotionSection = Field(default_factory=PromotionSection)
    notify: NotifySection | None = None
    score: ScoreSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        features, target = self.features, self.target
        if target.column in features:
            raise ValueError(f"target column '{target.column}' is also listed under 'features'")
        for column in self.preprocessing.fill_values:
            if column not in features:
                raise ValueError(f"preprocessing.fill_values names column '{column}', which is not in 'features'")
        if target.task == "classification":
            if not target.classes or len(set(map(str, target.classes))) != len(target.classes):
                raise ValueError("target.classes must list every label once for a classification target")
        elif target.classes is not None:
            raise ValueError("target.classes is for classification targets only")
        if self.training.model is None and self.training.model_kind == "cnn" and any(
                t != "numeric" for t in features.values()):
            raise ValueError("training.model_kind 'cnn' reads the features as one sequence: all must be numeric")
        allowed = METRICS[target.task]
        if self.compression.metric is not None and self.compression.metric not in allowed:
            raise ValueError(f"compression.metric '{self.compression.metric}' is not one of {', '.join(allowed)} "
                             f"for a {target.task} target")
        return self

    @property
    def metric(self) -> str:
        """The metric models are compared and compressed on."""
        return self.compression.metric or METRICS[self.target.task][0]

    @property
    def suite_file(self) -> Path:
        return expectations_dir() / (self.expectations or f"{self.name}.json")

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model or self.name.replace("_", "-")

    @property
    def score_dag_id(self) -> str:
        return f"{self.name}_score"

    @property
    def approval_required(self) -> bool:
        return self.promotion.approval == "required"

    @property
    def approval_dag_id(self) -> str:
        """The DAG whose runs hold this pipeline's candidates at the gate, one run per candidate."""
        return f"{self.name}_approval"

    def notifies(self, event: str) -> bool:
        return self.notify is not None and event in self.notify.on

    @property
    def champion_asset_uri(self) -> str:
        """The Airflow Asset a run updates when it moves `champion` (the MLflow URI of that model)."""
        return f"models:/{self.registered_model_name}@champion"

    @property
    def validated_data_asset_uri(self) -> str:
        """The Airflow Asset a run updates when its data passed validation."""
        return f"x-lepton://{self.name}/validated-data"

    def model_kind(self, params: RunParams) -> str:
        """What the run trains: the spec's own model class, else the run's `model_kind`."""
        return self.training.model or params.model_kind

    @property
    def feature_columns(self) -> list[str]:
        return list(self.features)

    def run_defaults(self) -> RunParams:
        """The run params this pipeline starts from: the Airflow form's defaults."""
        source = self.source
        values: dict[str, Any] = {"source_uri": source.run_uri, "window_days": source.window_days,
                                  "wait_timeout_minutes": source.wait.timeout_minutes,
                                  "wait_poke_seconds": source.wait.poke_seconds,
                                  "drift_max": self.drift.max, "drift_action": self.drift.action}
        for section in (self.training, self.merge, self.compression, self.validation):
            values.update(section.model_dump(exclude={"metric", "model", "model_kwargs"}))
        return RunParams(**values)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with the file it came from and that file's content hash."""

    spec: PipelineSpec
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.spec.name


def pipelines_dir() -> Path:
    return Path(os.environ.get("LEPTON_PIPELINES_DIR", PIPELINES_DIR))


def expectations_dir() -> Path:
    return Path(os.environ.get("LEPTON_EXPECTATIONS_DIR", EXPECTATIONS_DIR))


def _problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"field '{where}': {message}" if where else message)
    return problems


def parse_spec(text: str, path: Path) -> LoadedSpec:
    """Validate one spec's YAML text; raise SpecError naming the file, each field and what is allowed."""
    import yaml

    try:
        # libyaml's safe loader where PyYAML has it: the same documents, parsed many times faster (every task
        # parses its spec)
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise SpecError(f"pipeline spec '{path}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"pipeline spec '{path}' must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as err:
        listed = "\n  - ".join(_problems(err))
        raise SpecError(f"pipeline spec '{path}' is invalid:\n  - {listed}") from None
    if not spec.suite_file.is_file():
        raise SpecError(f"pipeline spec '{path}': field 'expectations': suite '{spec.suite_file.name}' not found "
                        f"in {spec.suite_file.parent} (make one with `lepton new-pipeline`)")
    return LoadedSpec(spec, path, hashlib.sha256(text.encode()).hexdigest())


def load_spec(path: Path) -> LoadedSpec:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read pipeline spec '{path}': {err}") from None
    return parse_spec(text, Path(path))


def spec_files(folder: Path | None = None) -> list[Path]:
    folder = folder or pipelines_dir()
    return sorted(p for p in folder.glob("*.y*ml") if re.fullmatch(r".*\.ya?ml", p.name))


def load_all(folder: Path | None = None, only: str | None = None) -> tuple[list[LoadedSpec], dict[Path, SpecError]]:
    """Every spec in the folder: the valid ones, and the error of each invalid one (they do not stop the rest).
    Where two specs name the same pipeline, the file named after it wins, else the first file; the other is an
    error. `only`: the pipeline Airflow is running a task of (its parsing context's dag_id): its spec alone where
    its file is named after it (the one that would win), so a task parses one spec rather than every one."""
    files = spec_files(folder)
    own = next((path for path in files if path.stem == only), None)
    if own is not None:
        try:
            spec = load_spec(own)
        except SpecError:
            spec = None  # reported by the whole parse below
        if spec is not None and spec.name == only:
            return [spec], {}
    loaded, errors = [], {}
    for path in files:
        try:
            loaded.append(load_spec(path))
        except SpecError as err:
            errors[path] = err
    return _one_per_name(loaded, errors)


def _one_per_name(loaded: list[LoadedSpec], errors: dict[Path, SpecError]):
    winners: dict[str, LoadedSpec] = {}
    for spec in sorted(loaded, key=lambda s: s.path.stem != s.name):  # stable: files named after it first
        if spec.name in winners:
            errors[spec.path] = SpecError(f"pipeline spec '{spec.path}': field 'name': '{spec.name}' is already the "
                                          f"name of '{winners[spec.name].path}'")
        else:
            winners[spec.name] = spec
    return [spec for spec in loaded if winners[spec.name] is spec], errors


def find_spec(name: str, folder: Path | None = None) -> LoadedSpec:
    """The spec whose pipeline is called `name` (a file path works too)."""
    if name.endswith((".yaml", ".yml")):
        return load_spec(Path(name))
    loaded, errors = load_all(folder)
    for spec in loaded:
        if spec.name == name:
            return spec
    for path, err in errors.items():
        if path.stem == name:
            raise err
    known = ", ".join(s.name for s in loaded) or "none"
    raise SpecError(f"no pipeline '{name}' in {folder or pipelines_dir()} (pipelines: {known})")
