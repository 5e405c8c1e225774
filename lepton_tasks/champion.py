"""The current champion, snapshotted into the run folder before training.

Drift is measured against the champion's data profile and a warm start begins from its weights and encoder. Both
read one snapshot taken once per run (`{run}/champion/`), so a champion that moves while this run trains changes
nothing about it, and a retry sees the same files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lepton_tasks.storage import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS, ENCODER, PROFILE = "merged/merged.safetensors", "model/encoder.json", "drift/profile.json"
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


def snapshot(tracking_uri: str, model_name: str, folder: Path) -> ChampionSnapshot | None:
    """The champion of `model_name`, copied into `folder` once (a retry reuses the copy); None when the model
    has no champion yet. A registry that cannot be reached raises: nothing may be decided without it."""
    done = folder / SNAPSHOT
    if done.exists():
        saved = read_json(done)
        return ChampionSnapshot(**saved) if saved else None
    from mlflow import MlflowClient

    champion = current_champion(MlflowClient(tracking_uri), model_name)
    with atomic_dir(folder) as tmp:
        found = _download(tracking_uri, model_name, champion, tmp, folder) if champion else None
        write_json(tmp / SNAPSHOT, found.to_dict() if found else {})
    return found


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


def _download(tracking_uri: str, model_name: str, version, tmp: Path, final: Path) -> ChampionSnapshot:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)

    def fetch(artifact: str) -> str:  # the file's path once the snapshot folder is in place
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=str(tmp))
        return str(final / Path(local).relative_to(tmp))

    weights, encoder = fetch(WEIGHTS), fetch(ENCODER)
    try:
        profile = fetch(PROFILE)
    except Exception as err:  # an older champion: no profile, so no drift comparison
        log.warning("champion version %s has no %s: %s", version.version, PROFILE, err)
        profile = None
    params = dict(MlflowClient(tracking_uri).get_run(version.run_id).data.params)
    return ChampionSnapshot(model_name, str(version.version), version.run_id, weights, encoder, params, profile)
