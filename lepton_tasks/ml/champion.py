"""The current champion, snapshotted into the run folder before training.

Drift is measured against the champion's data profile and a warm start begins from its weights and encoder. Both
read one snapshot taken once per run (`{run}/champion/`), so a champion that moves while this run trains changes
nothing about it, and a retry sees the same files.

Every file is read from the model version itself (`models:/NAME/VERSION/extra_files/...`, logged with the model
when it was registered), never from its MLflow run's artifacts, which a later attempt could log again. A champion
whose files cannot be read is "no usable champion": the run goes on from scratch and says so; a registry that
cannot be reached still fails the stage (retryable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lepton_tasks.core.storage import atomic_dir, read_json_if_exists, write_json
from lepton_tasks.data.manifests import WarmStart, own_model_params

log = logging.getLogger(__name__)

# the files logged with each model version (its `extra_files`): what the gate, drift, warm start and scoring read
WEIGHTS, ENCODER, PROFILE, VARIANTS = "merged.safetensors", "encoder.json", "profile.json", "variants.json"
SNAPSHOT = "snapshot.json"
CHAMPION = "champion"  # the registry alias of the model in service


@dataclass(frozen=True)
class ChampionSnapshot:
    """The champion version's files, copied into this run: weights, encoder, its run params, its data profile."""

    model_name: str
    version: str
    mlflow_run_id: str
    weights: str
    encoder: str
    params: dict
    profile: str | None  # None for a champion registered before drift profiles were logged

    def to_dict(self) -> dict:
        return asdict(self)

    def encoder_dict(self) -> dict:
        return json.loads(Path(self.encoder).read_text())

    def unfit_reason(self, spec, params) -> str | None:
        """Why this champion cannot be round 1's start for a run of `spec` (a `PipelineSpec`) with `params`
        (`RunParams`): other columns or kinds, other classes, another model; None when it fits."""
        from lepton_tasks.ml.features import Encoder

        encoder = Encoder.from_dict(self.encoder_dict())
        theirs = [(c.name, c.kind) for c in encoder.columns] + [(encoder.target, encoder.task)]
        ours = list(spec.features.items()) + [(spec.target.column, spec.target.task)]
        if theirs != ours:
            return f"champion version {self.version} was trained on other columns ({theirs} vs {ours})"
        if spec.target.task == "classification" and encoder.classes != [str(c) for c in spec.target.classes]:
            return f"champion version {self.version} has classes {encoder.classes}, not {spec.target.classes}"
        theirs, ours = self.params.get("model_class") or self.params.get("model_kind"), spec.model_kind(params)
        if theirs != ours:
            return f"champion version {self.version} is a {theirs} model, this run trains {ours}"
        own = own_model_params(ours, spec.training.model_kwargs)  # MLflow keeps the run's params as strings
        knob, value = ("model_kwargs", own["model_kwargs"]) if own else ("hidden_size", str(params.hidden_size))
        if self.params.get(knob) != value:
            return f"champion version {self.version} has {knob} {self.params.get(knob)}, this run {value}"
        return None


@dataclass(frozen=True)
class Snapshot:
    """What a run found at `champion`: a usable champion, or None with why not (`unusable` when there is one whose
    files cannot be read: the run goes on from scratch, and says so in its report, its log and MLflow)."""

    champion: ChampionSnapshot | None
    unusable: str | None = None

    @classmethod
    def of(cls, champion: dict | None, unusable: str | None = None) -> Snapshot:
        """A snapshot from its plain form (`snapshot.json`, or a drift manifest's `champion`, `champion_unusable`)."""
        return cls(ChampionSnapshot(**champion) if champion else None, unusable)

    @property
    def note(self) -> str:
        if self.champion:
            return f"champion version {self.champion.version}"
        return f"no usable champion: {self.unusable}" if self.unusable else "no champion yet"


def snapshot(tracking_uri: str, model_name: str, folder: Path) -> Snapshot:
    """The champion of `model_name`, copied into `folder` once (a retry reuses the copy). A registry that cannot
    be reached raises: nothing may be decided without it."""
    saved = read_json_if_exists(folder / SNAPSHOT)
    if saved is not None:
        if "model_name" in saved:  # a snapshot taken before unusable champions were recorded: the champion itself
            saved = {"champion": saved}
        return Snapshot.of(saved.get("champion"), saved.get("unusable"))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    champion = current_champion(client, model_name)
    with atomic_dir(folder) as tmp:
        found = _download(client, model_name, champion, tmp, folder) if champion else Snapshot(None)
        write_json(tmp / SNAPSHOT, {"champion": found.champion.to_dict() if found.champion else None,
                                    "unusable": found.unusable})
    return found


def version_file(model_name: str, version: str, name: str, into: Path) -> Path:
    """One file logged with a model version (its `extra_files`), downloaded into `into`."""
    import mlflow

    uri = f"models:/{model_name}/{version}/extra_files/{name}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))


def version_model(client, version, into: Path) -> tuple[Path, Path, dict]:
    """What rebuilds a model version: its weights' and encoder's files (downloaded into `into`) and its run's params
    (which MLflow never lets change)."""
    weights, encoder = (version_file(version.name, str(version.version), name, into) for name in (WEIGHTS, ENCODER))
    return weights, encoder, dict(client.get_run(version.run_id).data.params)


def is_unreachable(err: Exception) -> bool:
    """Whether a failed registry call says the registry could not be reached (try again later), rather than that
    what was asked for is gone or broken (a decision can be made now: no usable champion)."""
    import requests

    said = str(err)
    return isinstance(err, requests.RequestException | ConnectionError | TimeoutError) or any(
        part in said for part in ("Max retries exceeded", "Connection refused", "TEMPORARILY_UNAVAILABLE"))


def current_champion(client, model_name: str):
    """The version holding `champion`, or None when the model has no champion yet (or was never registered).
    Any other failure (the registry unreachable, say) propagates: decisions that need the champion fail closed."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if version is None else client.get_model_version(model_name, str(version))


def _download(client, model_name: str, version, tmp: Path, final: Path) -> Snapshot:
    """The champion version's files, or why they cannot be read (the registry unreachable raises)."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)

    def placed(path: Path) -> str:  # the file's path once the snapshot folder is in place
        return str(final / path.relative_to(tmp))

    try:
        weights, encoder, params = version_model(client, version, tmp)
    except Exception as err:
        if is_unreachable(err):
            raise
        why = f"champion version {version.version} of {model_name} cannot be read ({type(err).__name__}: {err})"
        log.warning("no usable champion: %s; this run starts from scratch and is not compared with it", why)
        return Snapshot(None, why)
    try:
        profile = placed(version_file(model_name, str(version.version), PROFILE, tmp))
    except Exception as err:  # a champion trained without a drift profile: no drift comparison
        log.warning("champion version %s has no %s: %s", version.version, PROFILE, err)
        profile = None
    found = ChampionSnapshot(model_name, str(version.version), version.run_id, placed(weights), placed(encoder),
                             params, profile)
    return Snapshot(found)


def warm_start(found: Snapshot, spec, params) -> WarmStart:
    """Where round 1 of a run of `spec` (a `PipelineSpec`) with `params` (`RunParams`) starts: the champion this
    run snapshotted when `init_from` asks for it and it fits, else the seeded init, with the reason."""
    if params.init_from == "scratch":
        return WarmStart(params.init_from, "init_from is scratch")
    champion = found.champion
    if champion is None:
        why = f"no usable champion ({found.unusable})" if found.unusable else "no champion yet"
        return WarmStart(params.init_from, why)
    unfit = champion.unfit_reason(spec, params)
    if unfit:
        return WarmStart(params.init_from, unfit)
    return WarmStart(params.init_from, f"round 1 starts from champion version {champion.version} (its weights and "
                     "encoder)", champion.version, champion.weights, champion.encoder)
