"""Compress: global magnitude pruning, ONNX export and onnxruntime int8 quantization (dynamic; static with calibration).

Variants: the merged model as ONNX fp32, pruned fp32, int8 (dynamic), pruned int8, and, given calibration rows,
static int8 and pruned static int8. Each is scored on the held-out split
(the pipeline's metrics), on disk (bytes, and bytes once deflated, which is where pruning's zeros pay off) and on
the CPU (onnxruntime, one thread: p50/p99 of a single row and p50 of a batch of 256 rows, every variant timed in
turn, round after round, so a slow moment of the machine is shared rather than pinned on one variant).

The chosen variant is the smallest on disk that is both within `tolerance` of the merged model's metric (in the
metric's own units) and not slower than the plain fp32 ONNX export, for a single row and for a batch (within
LATENCY_NOISE, what repeated timings of one model differ by); ties go to the smaller deflated size, then the
lower latency. Each variant's `verdict` says why it was or was not chosen (MLflow: `onnx/tradeoff.json`).
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lepton_tasks.core.storage import atomic_dir, sha256_file
from lepton_tasks.data.manifests import CompressManifest, Variant
from lepton_tasks.ml import plots
from lepton_tasks.ml.metrics import evaluate, worsening
from lepton_tasks.ml.models import ModelShape, load_checkpoint, load_model, predict

log = logging.getLogger(__name__)

LATENCY_ROUNDS = 6  # rounds of timing; in each, every variant in turn
SINGLE_RUNS = 25  # single-row calls per variant per round
BATCH_RUNS = 2  # batch calls per variant per round
BATCH_ROWS = 256
# rows per ONNX Runtime call when scoring a variant on the held-out split: each session's memory arena keeps the
# buffers of its largest call, so one call over 2M rows left every variant holding about a GiB
SCORING_ROWS = 16_384
LATENCY_NOISE = 0.05  # "not slower" allows this much: about the spread of one model's p50 between repeats
CHOSEN_FILE = "model.onnx"
FP32 = "onnx_fp32"  # the plain export every other variant must not be slower than
VARIANT_ORDER = ("onnx_fp32", "onnx_pruned_fp32", "onnx_int8", "onnx_pruned_int8", "onnx_static_int8",
                 "onnx_pruned_static_int8")


def prune_global(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all Linear/Conv layers (in place)."""
    from torch.nn.utils import prune

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    if sparsity > 0:
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
        for module, name in layers:
            prune.remove(module, name)
    return model


def export_onnx(model: torch.nn.Module, in_features: int, path: Path, slim: bool = True) -> Path:
    """Export with a dynamic batch dimension, as one self-contained file (`slim`: see `slim_onnx`). Its
    initializers are named after the model's state-dict keys."""
    example = (torch.zeros(2, in_features),)
    torch.onnx.export(model.eval(), example, str(path), input_names=["features"], output_names=["output"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                      verbose=False)
    return slim_onnx(path) if slim else path


def with_weights(exported: Path, dense: dict[str, torch.Tensor], model: torch.nn.Module, in_features: int,
                 path: Path) -> Path:
    """`model` as ONNX, where it has the architecture of the model `exported` (not slimmed) came from, whose
    weights were `dense`: the same graph with the weights that differ replaced, by state-dict key. Pruning only
    zeroes weights, so this gives what exporting the pruned model gives, without a second export (each one
    builds the exporter's operator registry again, about half of an export's time). Exported after all where
    a changed weight is not an initializer of that name and shape."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(exported))
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    changed = {name: tensor for name, tensor in model.state_dict().items()
               if name not in dense or not tensor.equal(dense[name])}
    if any(name not in initializers or tuple(initializers[name].dims) != tuple(tensor.shape)
           for name, tensor in changed.items()):
        return export_onnx(model, in_features, path)
    for name, tensor in changed.items():
        initializers[name].CopyFrom(numpy_helper.from_array(tensor.detach().numpy(), name))
    onnx.save(proto, str(path))
    return slim_onnx(path)


def slim_onnx(path: Path) -> Path:
    """Drop what only debugging reads (the exporter's per-node stack traces, long node and tensor names,
    intermediate shape annotations, doc strings): for a small model that is a quarter of the file; the inputs,
    outputs and inference are unchanged."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    del graph.value_info[:]
    keep = {v.name for v in [*graph.input, *graph.output]}  # the model's interface keeps its names
    short = {}
    for name in [i.name for i in graph.initializer] + [o for n in graph.node for o in n.output]:
        if name and name not in keep and name not in short:
            short[name] = f"t{len(short)}"
    for tensor in graph.initializer:
        tensor.name = short.get(tensor.name, tensor.name)
    for index, node in enumerate(graph.node):
        del node.metadata_props[:]
        node.doc_string, node.name = "", f"n{index}"
        node.input[:] = [short.get(name, name) for name in node.input]
        node.output[:] = [short.get(name, name) for name in node.output]
    graph.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def quantize_int8(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return slim_onnx(dst)


def quantize_static_int8(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """int8 weights and activations (QLinear ops), the activation ranges calibrated on training rows: the input
    is quantized once, not before every layer as in dynamic quantization, which is what makes a small model
    faster than fp32 on the CPU."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"features": batch}

    quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QOperator,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return slim_onnx(dst)


def _onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core: latency comparable with the PyTorch reference
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(rows: np.ndarray) -> np.ndarray:
        if len(rows) <= SCORING_ROWS:
            return session.run(None, {"features": rows})[0]
        return np.concatenate([session.run(None, {"features": rows[start:start + SCORING_ROWS]})[0]
                               for start in range(0, len(rows), SCORING_ROWS)])

    return run


def _latencies(predictors: dict[str, Callable], features: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per predictor: single-row p50 and p99 and batch p50 (ms), every predictor timed in turn each round."""
    batch = features[np.arange(BATCH_ROWS) % len(features)]
    rows = [features[i % len(features)][None, :] for i in range(SINGLE_RUNS)]
    single: dict[str, list[float]] = {name: [] for name in predictors}
    batched: dict[str, list[float]] = {name: [] for name in predictors}
    for predict_rows in predictors.values():  # warm-up: first-call allocations are not latency
        for _ in range(5):
            predict_rows(rows[0])
            predict_rows(batch)
    names = list(predictors)
    for round_index in range(LATENCY_ROUNDS):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            for row in rows:
                single[name].append(_timed_ms(predictors[name], row))
            batched[name] += [_timed_ms(predictors[name], batch) for _ in range(BATCH_RUNS)]
    return {name: (float(np.percentile(single[name], 50)), float(np.percentile(single[name], 99)),
                   float(np.percentile(batched[name], 50))) for name in names}


def _timed_ms(predict_rows: Callable, rows: np.ndarray) -> float:
    started = time.perf_counter()
    predict_rows(rows)
    return (time.perf_counter() - started) * 1000


def _deflated(path: Path) -> int:
    return len(zlib.compress(Path(path).read_bytes(), 6))


def _build_variants(shape: ModelShape, state: dict, sparsity: float, out: Path,
                    calibration: np.ndarray | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Every variant that can be made, and why each other one could not (an op of a pipeline's own model that a
    quantizer cannot handle, say): those are said in the manifest and the log, and the rest still compete. The
    fp32 export itself must work (the spec check tried it)."""
    dense_model = load_model(shape, state)
    exported = export_onnx(dense_model, shape.in_features, out / "fp32.onnx", slim=False)
    makers = {
        "onnx_pruned_fp32": lambda: with_weights(exported, dense_model.state_dict(),
                                                 prune_global(load_model(shape, state), sparsity),
                                                 shape.in_features, out / "pruned_fp32.onnx"),
        "onnx_fp32": lambda: slim_onnx(exported),
        "onnx_int8": lambda: quantize_int8(variants["onnx_fp32"], out / "int8.onnx"),
        "onnx_pruned_int8": lambda: quantize_int8(variants["onnx_pruned_fp32"], out / "pruned_int8.onnx"),
    }
    if calibration is not None and len(calibration):
        makers["onnx_static_int8"] = lambda: quantize_static_int8(variants["onnx_fp32"], out / "static_int8.onnx",
                                                                  calibration)
        makers["onnx_pruned_static_int8"] = lambda: quantize_static_int8(
            variants["onnx_pruned_fp32"], out / "pruned_static_int8.onnx", calibration)
    variants: dict[str, Path] = {}
    unmade: dict[str, str] = {}
    for name, make in makers.items():
        try:
            variants[name] = make()
        except Exception as err:
            if name == FP32:
                raise
            unmade[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            log.warning("variant %s could not be made (%s); choosing among the others", name, unmade[name])
    return {name: variants[name] for name in VARIANT_ORDER if name in variants}, unmade


def compress(merged_path: Path, merged_sha256: str, shape: ModelShape, eval_data: tuple[torch.Tensor, torch.Tensor],
             stage_dir: Path, metric: str, tolerance: float, sparsity: float,
             calibration: np.ndarray | None = None) -> CompressManifest:
    """Build, score and choose among the compressed variants; the chosen one is `{stage_dir}/model.onnx`.
    `calibration` (encoded training rows) adds the statically quantized variants."""
    state, _ = load_checkpoint(Path(merged_path), merged_sha256)
    features, targets = eval_data
    model = load_model(shape, state).eval()
    x, y = features.numpy(), targets.numpy()
    torch.set_num_threads(1)
    with atomic_dir(stage_dir) as tmp:
        paths, unmade = _build_variants(shape, state, sparsity, tmp, calibration)
        predictors = {"pytorch_fp32": _torch_predictor(model)} | {n: _onnx_session(p) for n, p in paths.items()}
        latency = _latencies(predictors, x)
        reference = _variant("pytorch_fp32", Path(merged_path), predict(model, features).numpy(), shape.task, y,
                             metric, latency)
        reference.within_tolerance = True
        variants = []
        for name, path in paths.items():
            variant = _variant(name, path, predictors[name](x), shape.task, y, metric, latency,
                               Path(stage_dir) / path.name)
            variant.within_tolerance = worsening(metric, reference.score, variant.score) <= tolerance + 1e-12
            variants.append(variant)
        chosen = _choose(variants, reference, metric, tolerance)
        shutil.copyfile(tmp / Path(chosen.path).name, tmp / CHOSEN_FILE)
        tradeoff = plots.compression_tradeoff([asdict(v) for v in [reference, *variants]], chosen.name, metric,
                                              tmp / "plots" / "compression_tradeoff.png")
    for v in variants:
        log.info("%-24s %s %.4f  %8d bytes  p50 %.3f ms  batch p50 %.3f ms: %s", v.name, metric, v.score, v.bytes,
                 v.latency_p50_ms, v.batch_latency_p50_ms, v.verdict)
    chosen_path = Path(stage_dir) / CHOSEN_FILE
    return CompressManifest(reference, variants, chosen.name, str(chosen_path), sha256_file(chosen_path),
                            metric, tolerance, sparsity, [str(Path(stage_dir) / "plots" / tradeoff.name)], unmade)


def _torch_predictor(model: torch.nn.Module) -> Callable:
    def run(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(rows)).numpy()

    return run


def _variant(name: str, path: Path, outputs: np.ndarray, task: str, targets: np.ndarray, metric: str,
             latency: dict, final_path: Path | None = None) -> Variant:
    metrics = evaluate(task, outputs, targets)
    p50, p99, batch_p50 = latency[name]
    return Variant(name, str(final_path or path), metrics[metric], metrics, path.stat().st_size, _deflated(path),
                   p50, p99, batch_p50)


def _choose(variants: list[Variant], reference: Variant, metric: str, tolerance: float) -> Variant:
    """The smallest variant within tolerance and not slower than the fp32 export; every variant's verdict set."""
    fp32 = next(v for v in variants if v.name == FP32)
    for v in variants:
        v.not_slower = (v.latency_p50_ms <= fp32.latency_p50_ms * (1 + LATENCY_NOISE)
                        and v.batch_latency_p50_ms <= fp32.batch_latency_p50_ms * (1 + LATENCY_NOISE))
    eligible = [v for v in variants if v.within_tolerance and v.not_slower]
    if not eligible:  # the fp32 export is the merged model itself: it only misses through an export error
        eligible = [min(variants, key=lambda v: abs(v.score - reference.score))]
        log.warning("no variant within tolerance; keeping %s", eligible[0].name)
    chosen = min(eligible, key=lambda v: (v.bytes, v.deflated_bytes, v.latency_p50_ms))
    for v in variants:
        v.verdict = _verdict(v, chosen, fp32, reference, metric, tolerance)
    return chosen


def _verdict(v: Variant, chosen: Variant, fp32: Variant, reference: Variant, metric: str, tolerance: float) -> str:
    if v is chosen:
        return f"chosen: the smallest within tolerance and not slower than {FP32}"
    if not v.within_tolerance:
        return f"{metric} {v.score:.4f} vs {reference.score:.4f} merged: outside the tolerance {tolerance:g}"
    if not v.not_slower:
        return (f"slower than {FP32}: p50 {v.latency_p50_ms:.3f} vs {fp32.latency_p50_ms:.3f} ms a row, "
                f"{v.batch_latency_p50_ms:.3f} vs {fp32.batch_latency_p50_ms:.3f} ms a batch of {BATCH_ROWS}")
    return f"larger than {chosen.name} ({v.bytes} vs {chosen.bytes} bytes)"
