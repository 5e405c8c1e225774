"""Train: one PyTorch model per shard, each on a Dask worker, for R rounds of the run's merge strategy.

Round r starts every shard from the same weights (the seeded init, then the previous round's merged model), trains
`local_epochs` on the shard the worker reads itself (with FedProx's proximal term, SCAFFOLD's correction or DP-SGD
where the params ask for them), and writes a safetensors checkpoint whose metadata records what it was made from:
the start weights, the params, the control variates, and the checksums of the shard's data and of the encoder.
After each round the run's strategy (`lepton_tasks.ml.strategies`) merges the round's checkpoints into the next global
model.
A retried task, or Dask recomputing a result lost with its worker, finds those checkpoints and trains only what
is missing; a checkpoint made from other data is never reused.

Determinism policy: the same data, params and seed give bit-equal weights on the CPU for a fixed thread count
(`LEPTON_TRAIN_THREADS`, default 1; MKL in its alignment-independent mode on Lepton's workers), and on a GPU with
PyTorch's deterministic algorithms on the same GPU model, driver and torch. Resumes, recomputed shards and
concurrent runs are held to exactly that (tests compare bits).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lepton_tasks.config.settings import stable_json
from lepton_tasks.core import store
from lepton_tasks.core.errors import TrainingError
from lepton_tasks.core.storage import sha256_file
from lepton_tasks.data.manifests import ShardInfo, TrainManifest, WarmStart
from lepton_tasks.infra.cluster import call_by_name, recovering
from lepton_tasks.ml.models import (
    ModelShape,
    build_model,
    init_weights,
    load_checkpoint,
    load_model,
    loss_fn,
    save_checkpoint,
)
from lepton_tasks.ml.strategies import Strategy, for_params
from lepton_tasks.ml.strategies.fedavg import fedavg
from lepton_tasks.ml.tensors import load_xy

log = logging.getLogger(__name__)

PROGRESS_TOPIC = "lepton-progress"


@dataclass
class ShardJob:
    """One shard's training in one round: everything a worker needs, all of it plain data."""

    shard: str
    round: int
    files: list[str]
    rows: int
    encoder: dict  # features.Encoder
    shape: ModelShape
    start: dict  # {"path", "sha256"} of the weights to start from
    out_path: str
    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    params_digest: str
    data_sha256: str  # the shard's Parquet files, from the shard manifest
    threads: int = 1  # torch threads: the determinism policy holds for a fixed count
    prox_mu: float = 0.0  # FedProx: weight of the proximal term; 0: off
    control: dict | None = None  # SCAFFOLD: {"server", "own"} ({"path", "sha256"} or None: zeros) from the last round
    control_out: str | None = None  # SCAFFOLD: where this shard's control variate for the next round goes
    privacy: dict | None = None  # DP-SGD (see `privacy`): noise_multiplier, max_grad_norm, sample_rate, ...
    optimizer: str = "adam"  # the local optimizer, "sgd" or "adam" (RunParams.optimizer)
    momentum: float = 0.0  # SGD's momentum

    def metadata(self) -> dict[str, str]:
        """What the checkpoint was made from; a checkpoint is reused only when all of it matches."""
        meta = {"shard": self.shard, "round": str(self.round), "rows": str(self.rows),
                "start_sha256": self.start["sha256"], "params_digest": self.params_digest,
                "data_sha256": self.data_sha256, "encoder_sha256": encoder_digest(self.encoder),
                "threads": str(self.threads)}
        if self.control is not None:
            meta["control_sha256"] = ":".join((c or {}).get("sha256", "") for c in self.control.values())
        return meta


def encoder_digest(encoder: dict) -> str:
    import hashlib

    return hashlib.sha256(stable_json(encoder).encode()).hexdigest()


def _report_progress(message: dict) -> None:
    """Send per-epoch progress to the task log through Dask's event stream (plain log outside Dask)."""
    try:
        from distributed import get_worker

        get_worker().log_event(PROGRESS_TOPIC, message)
    except ValueError:  # not running on a Dask worker
        log.info("progress %s", message)


def _start_model(job: ShardJob, device) -> torch.nn.Module:
    state = load_checkpoint(Path(job.start["path"]), job.start["sha256"])[0]
    return load_model(job.shape, state).to(device).train()


def _epoch_record(job: ShardJob, epoch: int, loss: float, started: float, batch_size: int) -> dict:
    record = {"shard": job.shard, "round": job.round, "epoch": epoch, "loss": loss,
              "seconds": time.perf_counter() - started, "batch_size": batch_size}
    _report_progress(record)
    return record


def _controls(job: ShardJob, device) -> tuple[dict, dict] | None:
    """SCAFFOLD's (c, c_i) for this round: the server's and this shard's control variates (zeros in round 1)."""
    if job.control is None:
        return None
    loaded = [load_checkpoint(Path(c["path"]), c["sha256"])[0] if c else None
              for c in (job.control["server"], job.control["own"])]
    if loaded[0] is None:
        return None  # round 1: c = c_i = 0, no correction
    own = loaded[1] or {k: torch.zeros_like(v) for k, v in loaded[0].items()}
    return ({k: v.to(device) for k, v in loaded[0].items()}, {k: v.to(device) for k, v in own.items()})


def local_optimizer(job: ShardJob, parameters) -> torch.optim.Optimizer:
    """The job's local optimizer: plain (or momentum) SGD, as the strategies' papers train, or Adam."""
    if job.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=job.learning_rate, momentum=job.momentum)
    return torch.optim.Adam(parameters, lr=job.learning_rate)


def _fit(job: ShardJob, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> tuple[dict, list[dict]]:
    """Train from `job.start` for `job.epochs` (with FedProx's proximal term and SCAFFOLD's correction where the
    job has them); returns the final state and per-epoch records (the data loss)."""
    from lepton_tasks.ml.strategies.fedprox import proximal_term
    from lepton_tasks.ml.strategies.scaffold import scaffold_correction

    model = _start_model(job, device)
    optimizer = local_optimizer(job, model.parameters())
    generator = torch.Generator().manual_seed(job.seed)
    start = [p.detach().clone() for p in model.parameters()] if job.prox_mu else None
    controls = _controls(job, device)
    epochs = []
    for epoch in range(1, job.epochs + 1):
        started, total_loss = time.perf_counter(), torch.zeros((), device=device)
        for idx in torch.randperm(len(y), generator=generator).to(device).split(batch_size):
            loss = loss_fn(job.shape, model(x[idx]), y[idx])
            objective = loss + proximal_term(model, start, job.prox_mu) if start is not None else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if controls is not None:
                scaffold_correction(model, *controls)
            optimizer.step()
            total_loss += loss.detach() * len(idx)  # summed on the device: no host sync per batch
        epochs.append(_epoch_record(job, epoch, total_loss.item() / len(y), started, batch_size))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, epochs


def _fit_private(job: ShardJob, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device) -> tuple[dict, list[dict]]:
    """DP-SGD through Opacus: Poisson-sampled batches of expected size `batch_size`, each sample's gradient
    clipped to `max_grad_norm`, Gaussian noise of `noise_multiplier` times that norm (seeded: the determinism
    policy holds; for a production privacy claim Opacus' secure_mode would draw from the OS instead)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = _start_model(job, device)
    generator = torch.Generator().manual_seed(job.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=generator)
    private, optimizer, private_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=local_optimizer(job, model.parameters()), data_loader=loader,
        noise_multiplier=job.privacy["noise_multiplier"], max_grad_norm=job.privacy["max_grad_norm"],
        noise_generator=generator)
    epochs = []
    for epoch in range(1, job.epochs + 1):
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        for xb, yb in private_loader:
            if not len(yb):
                continue  # Poisson sampling can draw an empty batch
            loss = loss_fn(job.shape, private(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss, seen = total_loss + loss.item() * len(yb), seen + len(yb)
        epochs.append(_epoch_record(job, epoch, total_loss / max(seen, 1), started, batch_size))
    return {k: v.detach().cpu() for k, v in private._module.state_dict().items()}, epochs


def _write_control(job: ShardJob, x: torch.Tensor, y: torch.Tensor, device) -> str:
    """SCAFFOLD: this shard's control variate for the next round (its full gradient at the start weights)."""
    from lepton_tasks.ml.strategies.scaffold import control_variate

    model = _start_model(job, device)
    batches = zip(x.split(4096), y.split(4096), strict=True)
    state = control_variate(model, batches, lambda out, target: loss_fn(job.shape, out, target))
    return save_checkpoint(Path(job.control_out), {k: v.cpu() for k, v in state.items()}, job.metadata())


def _deterministic(device: torch.device, threads: int) -> None:
    """The determinism policy, applied in the process that trains (see the module docstring)."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def train_shard(job: ShardJob) -> dict:
    """Train one shard from `job.start` and save its checkpoint; runs on a Dask worker.

    A checkpoint already written for exactly this job is returned instead (a result lost with its worker is
    recomputed by Dask in milliseconds). On GPU out-of-memory the shard starts again with half the batch size
    (said in the log), down to 1.
    """
    done = finished_checkpoint(job)
    if done is not None:
        return done
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _deterministic(device, job.threads)
    x, y = (t.to(device) for t in load_xy(job.files, job.encoder))  # the shard stays on the device
    control_sha = _write_control(job, x, y, device) if job.control_out else None
    fit = _fit_private if job.privacy else _fit
    batch_size = job.batch_size
    while True:
        try:
            state, epochs = fit(job, x, y, batch_size, device)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            log.warning("%s: GPU out of memory at batch size %d; retrying with %d", job.shard, batch_size,
                        batch_size // 2)
            _report_progress({"shard": job.shard, "round": job.round, "warning": "gpu_oom",
                              "batch_size": batch_size // 2})
            batch_size //= 2
    # the file is a function of the job alone (no wall times): a stale attempt that finishes after a retry
    # wrote the same checkpoint writes the same bytes, so the checksum in the manifest still holds
    curve = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in epochs]
    extra = {"control_out_sha256": control_sha} if control_sha else {}
    sha = save_checkpoint(Path(job.out_path), state,
                          {**job.metadata(), "epochs": json.dumps(curve), "device": str(device), **extra})
    return {**_result(job, sha, epochs, False, str(device)), **_control_result(job, control_sha)}


def train_shard_fields(fields: dict) -> dict:
    """`train_shard` of the job whose fields (`dataclasses.asdict`) these are; what the train stage submits."""
    return train_shard(ShardJob(**{**fields, "shape": ModelShape(**fields["shape"])}))


def _result(job: ShardJob, sha: str, epochs: list[dict], resumed: bool, device: str) -> dict:
    return {"shard": job.shard, "round": job.round, "path": job.out_path, "sha256": sha, "rows": job.rows,
            "epochs": epochs, "resumed": resumed, "device": device,
            "epsilon": privacy_spent(job.privacy, job.round) if job.privacy else None}


def _control_result(job: ShardJob, control_sha: str | None) -> dict:
    return {"control": {"path": job.control_out, "sha256": control_sha}} if control_sha else {}


def finished_checkpoint(job: ShardJob) -> dict | None:
    """The result of an earlier attempt at exactly this job, if its checkpoint is on disk and intact."""
    path = Path(job.out_path)
    if not store.fetch(path):  # here, or (a host sharing only the store) there
        return None
    try:
        _, meta = load_checkpoint(path)
    except Exception:  # a torn or foreign file: train again
        return None
    if any(meta.get(k) != v for k, v in job.metadata().items()):
        return None
    control_sha = meta.get("control_out_sha256")
    if job.control_out and not (control_sha and store.fetch(Path(job.control_out))
                                and sha256_file(Path(job.control_out)) == control_sha):
        return None  # its control variate is missing or torn: train again (it is written first)
    return {**_result(job, sha256_file(path), json.loads(meta.get("epochs", "[]")), True,
                      meta.get("device", "unknown")), **_control_result(job, control_sha)}


def privacy(params, rows: int, rounds: int) -> dict:
    """DP-SGD settings for a shard of `rows`: delta = 1/rows, Poisson sampling at batch_size/rows (as Opacus
    samples), and the noise multiplier that spends `params.dp_epsilon` over all `rounds` x local epochs (RDP
    accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    steps_per_epoch = math.ceil(rows / params.batch_size)
    sample_rate = 1 / steps_per_epoch
    steps = rounds * params.local_epochs * steps_per_epoch
    sigma = get_noise_multiplier(target_epsilon=params.dp_epsilon, target_delta=1 / rows, sample_rate=sample_rate,
                                 steps=steps, accountant="rdp")
    return {"noise_multiplier": sigma, "max_grad_norm": params.dp_max_grad_norm, "delta": 1 / rows,
            "sample_rate": sample_rate, "steps_per_round": params.local_epochs * steps_per_epoch,
            "target_epsilon": params.dp_epsilon}


def _privacy_by_shard(shards: list[ShardInfo], params, client) -> dict[str, dict]:
    """`privacy` for every shard, computed on the cluster's workers: Opacus' search for a noise multiplier is a
    numeric search per shard, which the workers share."""
    rows = [s.rows for s in shards]

    def calibrate(attempt: int) -> list[dict]:
        return client.gather(client.map(privacy, [params] * len(rows), rows, [params.merge_rounds] * len(rows),
                                        pure=False))

    return dict(zip([s.name for s in shards], recovering(client, "DP calibration", calibrate), strict=True))


def privacy_spent(settings: dict, rounds_done: int) -> float:
    """Epsilon a shard has spent after `rounds_done` rounds (RDP accountant, at its delta)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(settings["noise_multiplier"], settings["sample_rate"],
                           settings["steps_per_round"] * rounds_done)]
    return float(accountant.get_epsilon(settings["delta"]))


def _run_round(jobs: list[ShardJob], client) -> list[dict]:
    """Train the jobs without a finished checkpoint on the cluster; keep the order of `jobs`.

    A worker lost mid-shard: Dask reschedules the shard. A result lost with its worker: Dask recomputes it, which
    reads the checkpoint back. The scheduler lost: the round starts again from the checkpoints on disk once the
    cluster is back (`recovering`). A shard that keeps killing its workers ends, after the scheduler's
    `allowed-failures`, as a TrainingError naming it (shards that finished keep their checkpoints).
    """
    return recovering(client, f"train round {jobs[0].round}", lambda attempt: _attempt_round(jobs, client, attempt))


def _attempt_round(jobs: list[ShardJob], client, attempt: int) -> list[dict]:
    results = {job.shard: finished_checkpoint(job) for job in jobs}
    todo = [job for job in jobs if results[job.shard] is None]
    for job in jobs:
        if results[job.shard] is not None:
            log.info("round %d %s: resumed from %s", job.round, job.shard, job.out_path)
    check_memory(todo, client)
    # by name, the job as plain data: the scheduler that unpickles the task then never imports torch
    futures = [client.submit(call_by_name, f"{__name__}:train_shard_fields", asdict(job), pure=False,
                             key=f"train-r{job.round}-{job.shard}-{job.params_digest}-a{attempt}") for job in todo]
    try:
        for job, future in zip(todo, futures, strict=True):
            results[job.shard] = _outcome(job, future)
    except BaseException:
        _cancel_quietly(client, futures)  # the next attempt must not race a stale one for the same file
        raise
    return [results[job.shard] for job in jobs]


def _outcome(job: ShardJob, future) -> dict:
    """The shard's result; waits through Dask rescheduling or recomputing it. The shard's own failure becomes a
    TrainingError; a cancelled future (the scheduler was lost) is re-raised for `recovering`."""
    try:
        return future.result()
    except Exception as err:
        if future.status == "error":  # raised by train_shard itself, or KilledWorker
            raise TrainingError(_failure(job, err)) from err
        raise


def _cancel_quietly(client, futures: list) -> None:
    try:
        client.cancel(futures)
    except Exception as err:  # the scheduler is gone: nothing left to cancel
        log.debug("could not cancel stale futures: %s", err)


def _failure(job: ShardJob, err: BaseException) -> str:
    from distributed import KilledWorker

    if isinstance(err, KilledWorker):
        return (f"{job.shard} (round {job.round}) killed its Dask worker on every attempt ({err}); stopped "
                "instead of restarting it again: look for a crash or memory blow-up on that shard")
    return f"{job.shard} (round {job.round}) failed on its Dask worker: {type(err).__name__}: {err}"


MEMORY_FACTOR = 3  # raw frame, encoded float32 matrix and the tensors built from it live at once


def shard_memory_bytes(job: ShardJob) -> int:
    """A shard's peak memory while training, estimated from its rows and encoded width."""
    return job.rows * (job.shape.in_features + 1) * 4 * MEMORY_FACTOR


def check_memory(jobs: list[ShardJob], client) -> None:
    """Refuse, naming the limit, a shard that cannot fit the smallest worker's memory limit."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    limit = min((m for m in limits if m), default=0)
    if not limit:
        return
    usable = limit * 0.6  # Dask starts spilling at 60% of the limit, pausing at 80%, killing at 95%
    for job in jobs:
        need = shard_memory_bytes(job)
        if need > usable:
            raise TrainingError(
                f"{job.shard} needs about {need / 2**20:.0f} MiB to train ({job.rows} rows x "
                f"{job.shape.in_features} encoded features), more than the {usable / 2**20:.0f} MiB usable under "
                f"the Dask workers' memory limit of {limit / 2**20:.0f} MiB: raise param 'num_shards' or the "
                "workers' memory limit")


def _log_progress(event) -> None:
    _, msg = event
    if "warning" in msg:
        log.warning("round %d %s: %s, batch size now %d", msg["round"], msg["shard"], msg["warning"],
                    msg["batch_size"])
        return
    log.info("round %d %s epoch %d: loss %.4f (%.2fs)", msg["round"], msg["shard"], msg["epoch"], msg["loss"],
             msg["seconds"])


def train(shards: list[ShardInfo], encoder: dict, shape: ModelShape, params, stage_dir: Path, client,
          threads: int = 1, warm_start: WarmStart | None = None, dashboard_link: str | None = None) -> TrainManifest:
    """Run `params.merge_rounds` rounds over `shards` on the Dask `client`, each shard trained
    with `threads` torch threads; round 1 starts from the seeded init, or from `warm_start.weights` (the
    champion's checkpoint) when given."""
    stage_dir = Path(stage_dir)
    init_path = stage_dir / "init.safetensors"
    if warm_start and warm_start.weights:
        state = starting_weights(Path(warm_start.weights), shape)
        origin = {"from_champion_version": str(warm_start.version)}
    else:
        state, origin = init_weights(shape, params.seed), {"seed": str(params.seed)}
    init_sha = save_checkpoint(init_path, state, origin)
    manifest = TrainManifest(str(stage_dir), shape, {"path": str(init_path), "sha256": init_sha},
                             dashboard_link=dashboard_link, strategy=params.merge_strategy)
    strategy = for_params(params)
    private = _privacy_by_shard(shards, params, client) if params.dp_epsilon else {}
    start, controls = manifest.init, None
    client.subscribe_topic(PROGRESS_TOPIC, _log_progress)
    try:
        for rnd in range(1, params.merge_rounds + 1):
            jobs = [_job(s, rnd, encoder, shape, start, stage_dir, params, strategy, threads, controls,
                         private.get(s.name))
                    for s in shards]
            manifest.rounds.append(_run_round(jobs, client))
            state, start = _merge_round(strategy, state, manifest.rounds[-1], stage_dir / f"round-{rnd:02d}", rnd)
            manifest.merged.append(start)
            if strategy.control_variates:
                controls = _server_control(manifest.rounds[-1], stage_dir / f"round-{rnd:02d}", rnd)
    finally:
        _unsubscribe_quietly(client)
    return manifest


def _merge_round(strategy: Strategy, current: dict, results: list[dict], round_dir: Path,
                 rnd: int) -> tuple[dict, dict]:
    """The strategy's next global model from this round's checkpoints, written as `merged.safetensors`; a replayed
    round (a retried task) writes the same bytes."""
    states = [load_checkpoint(Path(c["path"]), c["sha256"])[0] for c in results]
    merged = strategy.aggregate(current, states, [c["rows"] for c in results])
    path = round_dir / "merged.safetensors"
    sha = save_checkpoint(path, merged, {"round": str(rnd), "strategy": strategy.name})
    return merged, {"path": str(path), "sha256": sha}


def _server_control(results: list[dict], round_dir: Path, rnd: int) -> dict:
    """SCAFFOLD: c = the sample-weighted mean of the shards' control variates (the full data's gradient at the
    round's global weights), and each shard's own, for the next round's jobs."""
    own = {c["shard"]: c["control"] for c in results}
    states = [load_checkpoint(Path(c["control"]["path"]), c["control"]["sha256"])[0] for c in results]
    path = round_dir / "control.safetensors"
    sha = save_checkpoint(path, fedavg(states, [c["rows"] for c in results]), {"round": str(rnd)})
    return {"server": {"path": str(path), "sha256": sha}, "own": own}


def starting_weights(path: Path, shape: ModelShape) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, if they fit `shape` tensor for tensor (TrainingError naming the first that does
    not)."""
    state = load_checkpoint(path)[0]
    expected = build_model(shape).state_dict()  # the shapes only: no seeding, no init of our own
    for name, tensor in expected.items():
        if name not in state or state[name].shape != tensor.shape:
            got = tuple(state[name].shape) if name in state else "missing"
            raise TrainingError(f"checkpoint '{path}' does not fit the model: '{name}' is {got}, "
                                f"the model needs {tuple(tensor.shape)}")
    return {name: state[name] for name in expected}


def _unsubscribe_quietly(client) -> None:
    try:
        client.unsubscribe_topic(PROGRESS_TOPIC)
    except Exception as err:  # the scheduler went away with the subscription
        log.debug("could not unsubscribe from %s: %s", PROGRESS_TOPIC, err)


def _job(shard: ShardInfo, rnd: int, encoder: dict, shape, start, stage_dir: Path, params,
         strategy: Strategy | None = None, threads: int = 1, controls: dict | None = None,
         private: dict | None = None) -> ShardJob:
    """One shard's training job for round `rnd`, as the run's `strategy` (default: `params`') trains it locally."""
    strategy = strategy or for_params(params)
    index = int(shard.name.rsplit("-", 1)[-1])
    round_dir = stage_dir / f"round-{rnd:02d}"
    scaffold = strategy.control_variates
    return ShardJob(
        shard=shard.name, round=rnd, files=shard.files, rows=shard.rows, encoder=encoder,
        shape=shape, start=start,
        out_path=str(round_dir / f"{shard.name}.safetensors"),
        epochs=params.local_epochs, learning_rate=params.learning_rate, batch_size=params.batch_size,
        seed=params.seed * 1_000_003 + rnd * 1_009 + index, params_digest=params.digest(),
        data_sha256=shard.sha256, threads=threads,
        prox_mu=strategy.proximal_mu,
        control={"server": (controls or {}).get("server"), "own": (controls or {}).get("own", {}).get(shard.name)}
        if scaffold else None,
        control_out=str(round_dir / f"{shard.name}.control.safetensors") if scaffold else None,
        privacy=private, optimizer=params.optimizer, momentum=params.local_momentum,
    )
