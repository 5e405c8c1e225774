"""Small, complete stage manifests (every nested record filled) for tests of the code between the stages."""

from __future__ import annotations

from lepton_tasks.data.manifests import (
    CompressManifest,
    DriftManifest,
    Failure,
    IngestManifest,
    MergeManifest,
    ModelShape,
    RegisterManifest,
    ShardInfo,
    ShardManifest,
    TrainManifest,
    ValidationManifest,
    Variant,
    WaitManifest,
    WarmStart,
)

DAY = {"day": "2026-11-10", "uri": "/data/landing/2026-11-10", "files": [{"path": "a.parquet", "rows": 90}]}


def _variant(name: str, score: float, size: int) -> Variant:
    return Variant(name, f"/run/compress/{name}.onnx", score, {"accuracy": score}, size, size // 2, 0.1, 0.2, 1.5,
                   True, True, f"{name}: why")


def every_stage() -> dict:
    """One manifest per stage of a two-shard, two-round run warm-started from champion version 3."""
    shards = [ShardInfo(f"shard-{i:03d}", [f"/run/shard/shard-{i:03d}/part-0.parquet"], 40 + i, {"0": 20, "1": 20 + i},
                        f"sha-{i}", keys=["north"] if i == 0 else None) for i in range(2)]
    checkpoint = {"shard": "shard-000", "round": 2, "path": "/run/train/round-02/shard-000.safetensors",
                  "sha256": "c0", "rows": 40, "epochs": [{"epoch": 1, "loss": 0.5}], "resumed": False, "epsilon": 4.0}
    return {
        "wait": WaitManifest("2026-11-10", [DAY]),
        "ingest": IngestManifest("/data/landing/{ds}", ["a.parquet"], "src-sha", "/run/ingest", ["/run/ingest/p0"],
                                 90, {"x": "double", "label": "int64"}, "stage-sha", 1234, window=[DAY]),
        "validate": ValidationManifest("suite", True, 12, 11, 1, [Failure("expect_x", "x", 2, [1.5])],
                                       "/run/validate/result.json", "/run/validate/docs/index.html",
                                       ["/run/validate/clean/p0"], 88, quarantined_rows=2,
                                       quarantine_path="/run/validate/quarantine"),
        "drift": DriftManifest("/run/drift", "/run/drift/profile.json", {"model_version": "3", "mlflow_run_id": "r3"},
                               0.25, "warn", {"x": 0.3, "label": 0.01}, "label", 0.3, "x", True,
                               champion={"model_name": "m", "version": "3"}),
        "shard": ShardManifest("/run/shard", 42, 0.2, "label", ["x"], shards, ShardInfo("eval", [], 10, {}, "e"),
                               {"task": "classification"}, WarmStart("champion", "from version 3", "3", "/w", "/e")),
        "train": TrainManifest("/run/train", ModelShape("mlp", 1, 2, 8), {"path": "/run/train/init", "sha256": "i"},
                               [[{**checkpoint, "round": 1, "epsilon": 2.0}], [checkpoint]], strategy="fedprox",
                               merged=[{"path": "/run/train/m1", "sha256": "m1"}]),
        "merge": MergeManifest("/run/merge/merged.safetensors", "merged-sha", 2, 10, "accuracy", {"accuracy": 0.9},
                               {"shard-000": {"accuracy": 0.8}}, [0.85, 0.9], ["/run/merge/curves.png"], "fedprox"),
        "compress": CompressManifest(_variant("torch_fp32", 0.9, 4000), [_variant("onnx_int8", 0.89, 1000)],
                                     "onnx_int8", "/run/compress/model.onnx", "onnx-sha", "accuracy", 0.02, 0.5),
        "register": RegisterManifest("http://mlflow", "1", "run-1", "m", "4", ["candidate", "champion"], "3",
                                     {"outcome": "promoted", "promoted": True}),
    }
