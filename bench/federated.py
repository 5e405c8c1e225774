"""Merging where it is hard: shards that differ, a shard that misbehaves, privacy (issue 13).

Every figure comes from the pipeline's own stages (ingest, validate, drift, shard with `shard_by`, train, merge;
`pipeline.run_in_process`; the stages before train run once per seed and data set, every strategy trains and
merges on the same shards) on MNIST-1D rows whose `site` column splits them label-skewed: per label, Dirichlet
(alpha 0.3) shares over 8 sites, the usual non-IID benchmark split (NIID-Bench). Scored on freshly generated
samples, never on training rows. Central training of the same training rows is the reference.

- `non_iid`: central vs fedavg, fedprox, fedadam, scaffold;
- `poisoned`: one site's labels shuffled: fedavg vs median vs trimmed_mean;
- `privacy`: fedavg under DP-SGD at epsilon 1, 3, 8 and off;
- `flower_side_by_side`: the same shards, model, initial weights, rounds, local epochs, seeds and strategy
  (FedAvg, FedProx) run by Flower (`bench/flower_app.py`, its simulation engine, in `.venv-flower`): Lepton's
  cluster start, train and merge stages' seconds over Flower's `run_simulation` wall (Ray's start included), 3
  interleaved repeats; both accuracies, and the ratio without Lepton's cluster start.
- `flower_parity`: each strategy Flower also ships (FedAvg, FedProx, FedAvgM, FedAdam, FedMedian, FedTrimmedAvg),
  Lepton's and Flower's own, on the same shards, initial weights and local loop (each strategy's paper's local
  optimizer, SGD, FedAvg's included; FedAvg with Adam locally beside them), over 20 rounds (PARITY_CONF), on two
  splits (Dirichlet 0.3, and two labels per site), 3 seeds: each strategy's median accuracy within 1 point of
  Flower's; and the best strategy's share of the gap between FedAvg and central training closed.

The scenarios' stage runs share one 2-worker Dask cluster (an external scheduler, as `make up` gives the DAGs), so
they pay no cluster start; the Lepton side of `flower_side_by_side` starts its own, as Flower starts Ray.

Each scenario runs for every seed in SEEDS (a new split and initialisation each); the results give every seed's
accuracy and the median. Where a strategy does not help, the table says so: nothing here is tuned per strategy
(one learning rate per local optimizer, LEARNING_RATE; each strategy trains with its paper's, `RunParams.optimizer`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from itertools import count
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import RESULTS, Repeats, environ, interleaved, record, shared_cluster, write_json
from bench.quality import FRESH_ROWS, _train, fresh_samples
from lepton_tasks.config.settings import EXPECTATIONS_DIR, PIPELINES_DIR, REPO_ROOT
from lepton_tasks.ml.models import evaluate, init_weights, load_checkpoint, load_model

ROWS, SITES, ALPHA = 6000, 8, 0.3
SEEDS = (42, 43, 44)
POISONED_SITE = "site-0"
BASE_CONF = {"model_kind": "mlp", "hidden_size": 64, "num_shards": SITES, "shard_by": "site", "merge_rounds": 5,
             "local_epochs": 2, "batch_size": 64, "learning_rate": 0.01}
SCENARIOS = {
    "non_iid": {"fedavg": {}, "fedprox": {"merge_strategy": "fedprox", "fedprox_mu": 0.01},
                "fedadam": {"merge_strategy": "fedadam"}, "scaffold": {"merge_strategy": "scaffold"}},
    "poisoned": {"fedavg": {}, "median": {"merge_strategy": "median"},
                 "trimmed_mean": {"merge_strategy": "trimmed_mean", "trim_fraction": 0.2}},
    "privacy": {"epsilon 1": {"dp_epsilon": 1.0}, "epsilon 3": {"dp_epsilon": 3.0}, "epsilon 8": {"dp_epsilon": 8.0},
                "off": {}},
}
SPEC_NAME = "lepton_mnist1d_sites"
FLOWER_PYTHON = REPO_ROOT / ".venv-flower" / "bin" / "python"
FLOWER_STRATEGIES = {"fedavg": {}, "fedprox": {"merge_strategy": "fedprox", "fedprox_mu": 0.01}}
# flower_parity and the gap closed: a federated budget (20 rounds of 2 local epochs; 5 rounds left every strategy
# undertrained, the papers run hundreds) and every strategy on its paper's local SGD, FedAvg included (McMahan et
# al. 2017 train locally with SGD), so that the strategies differ in their server side only; FedAvg with Adam
# locally (Lepton's default, `auto`) runs beside them as a reference, outside the gap's "best strategy"
PARITY_CONF = {**BASE_CONF, "merge_rounds": 20}
ADAM_REFERENCE = "fedavg_adam"
PARITY_STRATEGIES = {"fedavg": {"local_optimizer": "sgd"}, "fedprox": {"merge_strategy": "fedprox", "fedprox_mu": 0.01},
                     "fedavgm": {"merge_strategy": "fedavgm"}, "fedadam": {"merge_strategy": "fedadam"},
                     "median": {"merge_strategy": "median", "local_optimizer": "sgd"},
                     "trimmed_mean": {"merge_strategy": "trimmed_mean", "trim_fraction": 0.2, "local_optimizer": "sgd"},
                     ADAM_REFERENCE: {"local_optimizer": "adam"}}
# one learning rate per local optimizer, none per strategy: Adam's usual, and SGD's as the papers' MNIST runs
LEARNING_RATE = {"adam": 0.01, "sgd": 0.1}
SPLITS = ("dirichlet_0.3", "two_labels_per_site")


def dirichlet_sites(labels: np.ndarray, sites: int, alpha: float, seed: int) -> np.ndarray:
    """Each row's site: per label, shares drawn from Dirichlet(alpha) over the sites, its rows dealt by them."""
    rng = np.random.default_rng(seed)
    site = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * sites)) * len(rows)).astype(int)[:-1]
        for index, chunk in enumerate(np.split(rows, cuts)):
            site[chunk] = f"site-{index}"
    return site


def two_labels_per_site(labels: np.ndarray, sites: int, seed: int) -> np.ndarray:
    """McMahan et al. 2017's pathological split: rows sorted by label, cut into 2 x `sites` runs, two per site."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    runs = np.array_split(order, 2 * sites)
    site = np.empty(len(labels), dtype=object)
    for index, run in enumerate(rng.permutation(len(runs))):
        site[runs[run]] = f"site-{index // 2}"
    return site


def sites_frame(rows: int, seed: int, poisoned: bool = False, split: str = "dirichlet_0.3"):
    """MNIST-1D rows with a label-skewed `site` column (`split`: Dirichlet(ALPHA) shares per label, or two labels
    per site); `poisoned`: POISONED_SITE's labels shuffled."""
    from lepton_tasks.tools.demo_data import mnist1d_frame

    frame = mnist1d_frame(rows, seed)
    labels = frame["label"].to_numpy()
    frame["site"] = two_labels_per_site(labels, SITES, seed) if split == "two_labels_per_site" else \
        dirichlet_sites(labels, SITES, ALPHA, seed)
    if poisoned:
        mine = np.flatnonzero(frame["site"].to_numpy() == POISONED_SITE)
        frame.loc[mine, "label"] = np.random.default_rng(seed).permutation(frame.loc[mine, "label"].to_numpy())
    return frame


def write_sites_spec(folder: Path) -> tuple[Path, Path]:
    """The bundled MNIST-1D pipeline as a new pipeline would be added: a spec file and a suite (the bundled one,
    with the `site` column), nothing else."""
    spec = yaml.safe_load((PIPELINES_DIR / "lepton_mnist1d.yaml").read_text())
    spec.update(name=SPEC_NAME, expectations="mnist1d_sites.json", schedule=None, score=None)
    spec["source"]["uri"] = "landing/sites/"
    suite = json.loads((EXPECTATIONS_DIR / "mnist1d.json").read_text())
    suite["name"] = "mnist1d_sites"
    for expectation in suite["expectations"]:
        if expectation["type"] == "expect_table_columns_to_match_ordered_list":
            expectation["kwargs"]["column_list"].append("site")
    pipelines, expectations = folder / "pipelines", folder / "expectations"
    pipelines.mkdir(parents=True, exist_ok=True)
    expectations.mkdir(exist_ok=True)
    (pipelines / f"{SPEC_NAME}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (expectations / "mnist1d_sites.json").write_text(json.dumps(suite))
    return pipelines, expectations


def _use_data_root(work: Path, name: str, frame=None) -> Path:
    """`work/name` as the data root (and its MLflow store) of the stage runs that follow; `frame` landed there."""
    data_root = work / name
    if frame is not None:
        landing = data_root / "landing" / "sites"
        landing.mkdir(parents=True)
        frame.to_parquet(landing / "sites.parquet", index=False)
    os.environ["LEPTON_DATA_ROOT"] = str(data_root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{data_root}/mlflow.db"
    return data_root


@contextmanager
def prepared(work: Path, loaded, frame, conf: dict, name: str) -> Iterator[dict]:
    """The stages before train (ingest, validate, drift, shard) run once on `frame`: their manifests, for the runs
    of every strategy over the same shards (`stage_run(done=...)`); removed afterwards."""
    from lepton_tasks.orchestration import pipeline

    data_root = _use_data_root(work, name, frame)
    try:
        manifests, _ = pipeline.run_in_process(pipeline.context(loaded, name, conf), last="shard")
        yield manifests
    finally:
        shutil.rmtree(data_root, ignore_errors=True)


def stage_run(work: Path, loaded, frame, conf: dict, name: str, export: Path | None = None,
              done: dict | None = None) -> dict:
    """The pipeline's stages up to merge on `frame` (or train and merge on the shards of `done`, from `prepared`):
    the merged model's accuracy on fresh samples, the train and merge stages' seconds, each shard's rows, and the
    epsilon each shard spent. `export`: also write what Flower needs to train the same thing there (`_export`)."""
    from lepton_tasks.orchestration import pipeline

    data_root = _use_data_root(work, name, None if done else frame)
    ctx = pipeline.context(loaded, name, conf)
    started = time.perf_counter()
    manifests, seconds = pipeline.run_in_process(ctx, last="merge", done=done)
    wall = time.perf_counter() - started
    shards, merged = manifests["shard"], manifests["merge"]
    shape = pipeline._shape(ctx, shards)
    state, _ = load_checkpoint(Path(merged.merged_path), merged.merged_sha256)
    xt, yt = fresh_samples(shards.encoder)
    result = {"accuracy": evaluate(load_model(shape, state), shape, xt, yt)["accuracy"],
              "train_merge_s": seconds["train"] + seconds["merge"], "cluster_s": seconds.get("cluster", 0.0),
              "wall_s": wall,
              "shard_rows": {s.name: s.rows for s in shards.shards},
              "epsilon": {c["shard"]: c["epsilon"] for c in manifests["train"].final_round if c.get("epsilon")},
              "soup": merged.soup}
    if export is not None:
        _export(manifests, shape, export)
    shutil.rmtree(data_root, ignore_errors=True)
    return result


def _export(manifests: dict, shape, out: Path) -> None:
    """The run's shards, encoded as it trained on them, its initial weights and model shape, for Flower."""
    from safetensors.torch import save_file

    from lepton_tasks.ml.tensors import load_xy

    out.mkdir(parents=True, exist_ok=True)
    shards = manifests["shard"]
    paths = []
    for info in shards.shards:
        x, y = load_xy(info.files, shards.encoder)
        paths.append(str(out / f"{info.name}.safetensors"))
        save_file({"x": x, "y": y}, paths[-1])
    shutil.copy(manifests["train"].init["path"], out / "init.safetensors")
    (out / "run.json").write_text(json.dumps({"shards": paths, "init": str(out / "init.safetensors"),
                                              "shape": asdict(shape), "encoder": shards.encoder}))


def central(loaded, frame, conf: dict, seed: int) -> float:
    """Central training of every non-held-out row (as the shard stage holds out) from the same initialisation for
    rounds x local epochs, scored on the same fresh samples."""
    from lepton_tasks.config.settings import parse_params
    from lepton_tasks.ml.features import fit, partition_stats
    from lepton_tasks.ml.tensors import model_shape
    from lepton_tasks.stages.shard import held_out_mask

    params = parse_params({**conf, "seed": seed}, loaded.spec.run_defaults())
    training = frame[~held_out_mask(np.arange(len(frame)), seed, params.eval_fraction)]
    encoder = fit(loaded.spec, partition_stats(training, loaded.spec))
    x = torch.from_numpy(encoder.encode_features(training))
    y = torch.from_numpy(encoder.encode_target(training[encoder.target]))
    shape = model_shape(encoder, params.model_kind, params.hidden_size)
    torch.set_num_threads(1)
    state = _train(shape, init_weights(shape, seed), x, y, params.merge_rounds * params.local_epochs, params, seed)
    xt, yt = fresh_samples(encoder)
    return evaluate(load_model(shape, state), shape, xt, yt)["accuracy"]


@contextmanager
def sites_pipeline(work: Path):
    """The sites spec loaded, and one 2-worker Dask cluster (Lepton's worker settings) every stage run uses."""
    from lepton_tasks.config.specs import find_spec

    pipelines, expectations = write_sites_spec(work / "spec")
    # put back afterwards: the benchmarks after this one read the bundled specs
    with environ(LEPTON_PIPELINES_DIR=str(pipelines), LEPTON_EXPECTATIONS_DIR=str(expectations)), shared_cluster():
        yield find_spec(SPEC_NAME)


def federated_bench(work: Path, seeds=SEEDS) -> dict:
    """Every scenario for every seed; returns the detail (written to bench/results/federated.json)."""
    with sites_pipeline(work) as loaded:
        return _scenarios(work, loaded, seeds)


def _scenarios(work: Path, loaded, seeds) -> dict:
    runs: dict[str, dict[str, list]] = {scenario: {name: [] for name in variants}
                                        for scenario, variants in SCENARIOS.items()}
    runs["non_iid"]["central"] = []
    for seed in seeds:
        clean, poisoned = sites_frame(ROWS, seed), sites_frame(ROWS, seed, poisoned=True)
        runs["non_iid"]["central"].append({"accuracy": central(loaded, clean, BASE_CONF, seed), "seed": seed})
        base = {**BASE_CONF, "seed": seed}  # what every strategy's run shares up to its shards
        with prepared(work, loaded, clean, base, f"clean-{seed}") as clean_shards, \
                prepared(work, loaded, poisoned, base, f"poisoned-{seed}") as poisoned_shards:
            for scenario, variants in SCENARIOS.items():
                for name, conf in variants.items():
                    if scenario == "privacy" and name == "off":
                        runs[scenario][name].append(runs["non_iid"]["fedavg"][-1])  # the same run
                        continue
                    label = f"{scenario}-{name.replace(' ', '-')}-{seed}"
                    result = stage_run(work, loaded, None, _parity_conf(conf, seed), label,
                                       done=poisoned_shards if scenario == "poisoned" else clean_shards)
                    runs[scenario][name].append({**result, "seed": seed})
                    print(f"{scenario} {name} seed {seed}: accuracy {result['accuracy']:.3f}, train+merge "
                          f"{result['train_merge_s']:.1f}s", flush=True)
    medians = {scenario: {name: statistics.median(r["accuracy"] for r in results)
                          for name, results in variants.items()} for scenario, variants in runs.items()}
    return {"rows": ROWS, "sites": SITES, "dirichlet_alpha": ALPHA, "seeds": list(seeds), "fresh_rows": FRESH_ROWS,
            "poisoned_site": POISONED_SITE, "conf": BASE_CONF, "scenarios": SCENARIOS,
            "median_accuracy": medians, "runs": runs}


def plot(detail: dict, path: Path) -> Path:
    """Median fresh-sample accuracy per strategy, one panel per scenario, every seed as a dot."""
    from lepton_tasks.ml.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(detail["runs"]), figsize=(13, 4))
    for ax, (scenario, variants) in zip(axes, detail["runs"].items(), strict=True):
        names = list(variants)
        ax.bar(names, [detail["median_accuracy"][scenario][n] for n in names], color="lightsteelblue")
        for index, name in enumerate(names):
            ax.scatter([index] * len(variants[name]), [r["accuracy"] for r in variants[name]], color="black", s=10)
        ax.set(title=scenario.replace("_", " "), ylabel="accuracy (fresh samples)", ylim=(0, 1))
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"MNIST-1D, {detail['sites']} label-skewed sites (Dirichlet {detail['dirichlet_alpha']}), "
                 f"medians of {len(detail['seeds'])} seeds")
    return _save(fig, path)


def _flower_run(conf: dict, out: Path) -> dict:
    """One strategy's run for `flower_app.py`, with Lepton's resolved settings for `conf`: the strategy, its local
    optimizer and learning rate, its server hyperparameters."""
    from lepton_tasks.config.settings import RunParams
    from lepton_tasks.ml.strategies import for_params
    from lepton_tasks.ml.strategies.fedadam import ADAM_BETA2, ADAM_TAU

    params = RunParams(source_uri="bench", **{k: v for k, v in conf.items() if k in RunParams.model_fields})
    strategy = for_params(params)
    return {"strategy": params.merge_strategy, "out": str(out), "optimizer": params.optimizer,
            "learning_rate": params.learning_rate, "momentum": params.local_momentum,
            "fedprox_mu": params.fedprox_mu, "server_learning_rate": getattr(strategy, "learning_rate", 1.0),
            "server_momentum": params.server_momentum, "trim_fraction": params.trim_fraction,
            "adam_beta2": ADAM_BETA2, "adam_tau": ADAM_TAU}


def _flower_many(work: Path, run: Path, conf: dict, runs: list[dict], name: str) -> tuple[float, list[float]]:
    """Flower trains what the Lepton run exported to `run`, once per entry of `runs` (`_flower_run`), in one
    simulation; its seconds and each final model's accuracy on the fresh samples."""
    from lepton_tasks.ml.tensors import model_shape

    exported = json.loads((run / "run.json").read_text())
    job = {**exported, "runs": runs, "rounds": conf["merge_rounds"], "local_epochs": conf["local_epochs"],
           "batch_size": conf["batch_size"], "seed": conf["seed"], "cpus": os.cpu_count()}
    job_path = work / f"flower-{name}.json"
    job_path.write_text(json.dumps(job))
    done = subprocess.run([str(FLOWER_PYTHON), str(REPO_ROOT / "bench" / "flower_app.py"), str(job_path)],
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_DEDUP_LOGS": "0"},
                          capture_output=True, text=True, timeout=1800, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"the Flower run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    encoder = exported["encoder"]
    shape = model_shape(encoder, exported["shape"]["kind"], exported["shape"]["hidden"])
    xt, yt = fresh_samples(encoder)
    accuracies = [evaluate(load_model(shape, load_checkpoint(Path(r["out"]))[0]), shape, xt, yt)["accuracy"]
                  for r in runs]
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], accuracies


def _flower(work: Path, run: Path, conf: dict, strategy: str, repeat: int) -> tuple[float, dict]:
    """Flower trains what the Lepton run exported to `run`; its seconds and the accuracy of its final model."""
    started = time.perf_counter()
    seconds, [accuracy] = _flower_many(work, run, conf, [_flower_run(conf, work / f"flower-{strategy}-{repeat}.st")],
                                       f"{strategy}-{repeat}")
    return seconds, {"accuracy": accuracy, "process_wall_s": time.perf_counter() - started}


def _lepton_side(work: Path, loaded, shards: dict, conf: dict, strategy: str, export: Path) -> tuple[float, dict]:
    """Lepton's train and merge stages on the `prepared` shards and a Dask cluster started for the run, its start
    counted: Flower's wall counts Ray's start, so neither side gets warm workers the other lacks. The first run
    (value goes first in the first round) also exports what Flower trains on, after its stages are timed."""
    with environ(LEPTON_DASK_ADDRESS=None):
        result = stage_run(work, loaded, None, conf, f"side-{strategy}-{time.monotonic_ns()}", done=shards,
                           export=None if (export / "run.json").exists() else export)
    return result["cluster_s"] + result["train_merge_s"], result


def _flower_side(work: Path, run: Path, conf: dict, strategy: str, repeats: Iterator[int]) -> tuple[float, dict]:
    return _flower(work, run, conf, strategy, next(repeats))


def flower_side_by_side(work: Path, seed: int = SEEDS[0]) -> tuple[dict, dict]:
    """FedAvg and FedProx, Lepton's stages vs Flower on the same non-IID shards: {name: summary}, detail."""
    frame = sites_frame(ROWS, seed)
    summaries, detail = {}, {}
    with sites_pipeline(work) as loaded, \
            prepared(work, loaded, frame, {**BASE_CONF, "seed": seed}, "flower-shards") as shards:
        for strategy, extra in FLOWER_STRATEGIES.items():
            conf = _parity_conf(extra, seed)
            run = work / f"export-{strategy}"
            measured = interleaved(partial(_lepton_side, work, loaded, shards, conf, strategy, run),
                                   partial(_flower_side, work, run, conf, strategy, count(1)),
                                   label=f"Lepton vs Flower, {strategy}")
            lepton_accuracy = statistics.median(d["value"]["accuracy"] for d in measured.details)
            without_start = [d["value"]["train_merge_s"] for d in measured.details]
            flower_accuracy = statistics.median(d["baseline"]["accuracy"] for d in measured.details)
            name = "flower_side_by_side" + ("" if strategy == "fedavg" else f"_{strategy}")
            summaries[name] = record(
                measured, f"{strategy}: Lepton's cluster start + train + merge at most Flower's run_simulation wall "
                "(Ray's start included), accuracy at least Flower's minus 0.5 points", "s", False,
                lambda r, la=lepton_accuracy, fa=flower_accuracy: r <= 1.0 and la >= fa - 0.005,
                lepton_accuracy=lepton_accuracy, flower_accuracy=flower_accuracy,
                lepton_without_cluster_start_s=statistics.median(without_start),
                ratio_without_cluster_start=statistics.median(
                    w / b for w, b in zip(without_start, measured.baselines, strict=True)),
                rows=ROWS, sites=SITES, conf=conf, flower="flwr 1.42 simulation engine (Ray), one CPU per client")
            detail[strategy] = {"lepton": [d["value"] for d in measured.details],
                                "flower": [d["baseline"] for d in measured.details]}
    return summaries, detail


def _parity_conf(extra: dict, seed: int, base: dict = BASE_CONF) -> dict:
    """The bench's run params for one strategy over `base`: its local optimizer (`extra`'s, else its paper's:
    `auto`), that optimizer's rate."""
    from lepton_tasks.config.settings import RunParams

    optimizer = RunParams(source_uri="bench", **extra).optimizer
    return {**base, **extra, "seed": seed, "learning_rate": LEARNING_RATE[optimizer]}


def _parity_seed(work: Path, loaded, split: str, seed: int) -> dict:
    """Every parity strategy, Lepton's stages and Flower's, on one split and seed; central training beside them."""
    frame = sites_frame(ROWS, seed, split=split)
    found = {"central": central(loaded, frame, {**PARITY_CONF, "learning_rate": LEARNING_RATE["adam"]}, seed)}
    export, flower_runs = work / f"parity-export-{split}-{seed}", []
    with prepared(work, loaded, frame, {**PARITY_CONF, "seed": seed}, f"parity-{split}-{seed}") as shards:
        for name, extra in PARITY_STRATEGIES.items():
            conf = _parity_conf(extra, seed, PARITY_CONF)
            result = stage_run(work, loaded, None, conf, f"parity-{split}-{name}-{seed}", done=shards,
                               export=None if (export / "run.json").exists() else export)
            found[name] = {"lepton": result["accuracy"], "learning_rate": conf["learning_rate"]}
            flower_runs.append(_flower_run(conf, work / f"parity-{split}-{name}-{seed}.st"))
    _, accuracies = _flower_many(work, export, {**PARITY_CONF, "seed": seed}, flower_runs, f"parity-{split}-{seed}")
    for name, accuracy in zip(PARITY_STRATEGIES, accuracies, strict=True):
        found[name]["flower"] = accuracy
        print(f"parity {split} seed {seed} {name}: Lepton {found[name]['lepton']:.3f}, Flower {accuracy:.3f}",
              flush=True)
    shutil.rmtree(export, ignore_errors=True)
    return found


def flower_parity(work: Path, seeds=SEEDS) -> tuple[dict, dict]:
    """`flower_parity` (see the module docstring): {name: summary}, detail."""
    by_split = {}
    with sites_pipeline(work) as loaded:
        for split in SPLITS:
            by_split[split] = [_parity_seed(work, loaded, split, seed) for seed in seeds]
    return parity_summaries(by_split, seeds)


def _gap_points(one: float, other: float) -> float:
    """The gap between two accuracies on the FRESH_ROWS fresh samples, in points, counted in samples: 0.297 - 0.287
    is 0.010000000000000009 in floating point, and 20 samples, exactly 1 point."""
    return abs(round(one * FRESH_ROWS) - round(other * FRESH_ROWS)) * 100 / FRESH_ROWS


def parity_summaries(by_split: dict[str, list[dict]], seeds) -> tuple[dict, dict]:
    """The summaries and detail of `flower_parity` from each split's per-seed results (`_parity_seed`'s). The
    1-point goal holds for the strategies Flower ships; FedAvg with local Adam is reported beside them, not held
    to it (Adam's normalised steps turn the two sides' different float rounding into different trajectories)."""
    summaries, detail = {}, {"seeds": list(seeds), "rows": ROWS, "sites": SITES, "conf": PARITY_CONF,
                             "learning_rate": LEARNING_RATE, "strategies": PARITY_STRATEGIES, "splits": {}}
    for split, runs in by_split.items():
        lepton = {n: statistics.median(r[n]["lepton"] for r in runs) for n in PARITY_STRATEGIES}
        flower = {n: statistics.median(r[n]["flower"] for r in runs) for n in PARITY_STRATEGIES}
        gaps = {n: _gap_points(lepton[n], flower[n]) for n in PARITY_STRATEGIES}
        held = {n: gap for n, gap in gaps.items() if n != ADAM_REFERENCE}
        central_median = statistics.median(r["central"] for r in runs)
        best = max((n for n in lepton if n != ADAM_REFERENCE), key=lepton.get)  # among the local-SGD strategies
        closed = (lepton[best] - lepton["fedavg"]) / (central_median - lepton["fedavg"]) \
            if central_median > lepton["fedavg"] else None
        detail["splits"][split] = {"lepton": lepton, "flower": flower, "gap_points": gaps, "central": central_median,
                                   "best": best, "gap_closed": closed, "runs": runs}
        summaries[f"flower_parity_{split}"] = record(
            Repeats([lepton[n] for n in held], [flower[n] for n in held]),
            "every strategy Flower ships within 1 point of Flower's own implementation (median accuracy, 3 seeds)",
            "accuracy", True, lambda r, g=held: max(g.values()) <= 1.0, max_gap_points=max(held.values()),
            gap_points=gaps, lepton=lepton, flower=flower, central=central_median, best=best, gap_closed=closed,
            strategies=list(held), reference_not_held=ADAM_REFERENCE)
    dirichlet = detail["splits"][SPLITS[0]]
    runs = by_split[SPLITS[0]]
    summaries["federated_gap_closed"] = record(
        Repeats([r[dirichlet["best"]]["lepton"] for r in runs], [r["fedavg"]["lepton"] for r in runs]),
        f"the best strategy closes >= 30% of the gap between FedAvg and central training ({SPLITS[0]}, medians; "
        "every strategy and FedAvg on the papers' local SGD)",
        "accuracy", True, lambda r, c=dirichlet["gap_closed"]: c is not None and c >= 0.3,
        best=dirichlet["best"], gap_closed=dirichlet["gap_closed"], central=dirichlet["central"],
        fedavg=dirichlet["lepton"]["fedavg"], best_accuracy=dirichlet["lepton"][dirichlet["best"]],
        fedavg_local_adam=dirichlet["lepton"][ADAM_REFERENCE], rounds=PARITY_CONF["merge_rounds"])
    return summaries, detail


def rescore(results: Path = RESULTS) -> dict:
    """`flower_parity`'s summaries derived again from the per-seed results stored in `results` (no training):
    `python -m bench.federated rescore` after a change to how they are judged. Rewrites flower_parity.json and
    merges the summaries into summary.json; returns them."""
    stored = json.loads((results / "flower_parity.json").read_text())
    summaries, detail = parity_summaries({split: found["runs"] for split, found in stored["splits"].items()},
                                         stored["seeds"])
    summary = json.loads((results / "summary.json").read_text())
    summary["benchmarks"].update(summaries)
    write_json("flower_parity.json", detail)
    write_json("summary.json", summary)
    return summaries


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["rescore"]:
        raise SystemExit("usage: python -m bench.federated rescore")
    for name, found in rescore().items():
        print(name, "met" if found["met"] else "MISSED", found.get("max_gap_points", found.get("gap_closed")))
