"""Compress: global magnitude pruning, ONNX export and onnxruntime int8 quantization (dynamic; static with calibration).

Variants: the merged model as ONNX fp32, pruned fp32, int8 (dynamic), pruned int8, and, given calibration rows,
static int8 and pruned static int8. Each is scored on the held-out split
(the pipeline's metrics), on disk (bytes, and bytes once deflated, which is where pruning's zeros pay off) and on
the CPU (single-row latency p50/p99 in onnxruntime). The chosen variant is the smallest on disk whose metric is
within `tolerance` of the merged model's, in the metric's own units; ties go to the smaller deflated size, then
the lower latency.
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lepton_tasks import plots
from lepton_tasks.metrics import evaluate, worsening
from lepton_tasks.models import ModelShape, load_checkpoint, load_model, predict
from lepton_tasks.storage import atomic_dir, sha256_file

log = logging.getLogger(__name__)

LATENCY_RUNS = 200
CHOSEN_FILE = "model.onnx"


@dataclass
class Variant:
    """One compressed form of the merged model and how it scores."""

    name: str
    path: str
    score: float  # the pipeline's metric
    metrics: dict[str, float]
    bytes: int
    deflated_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    within_tolerance: bool = False


@dataclass
class CompressManifest:
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

    def to_dict(self) -> dict:
        return asdict(self)


def prune_global(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Zero the `sparsity` fraction of smallest-magnitude weights across all Linear/Conv layers (in place)."""
    from torch.nn.utils import prune

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    if sparsity > 0:
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
        for module, name in layers:
            prune.remove(module, name)
    return model


def export_onnx(model: torch.nn.Module, in_features: int, path: Path) -> Path:
    """Export with a dynamic batch dimension, as one self-contained file."""
    example = (torch.zeros(2, in_features),)
    torch.onnx.export(model.eval(), example, str(path), input_names=["features"], output_names=["output"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                      verbose=False)
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


def _onnx_scores(path: Path, task: str, features: np.ndarray, targets: np.ndarray) -> tuple[dict, float, float]:
    """Held-out metrics and single-row latency p50/p99 (ms) of an ONNX file in onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core: latency comparable with the PyTorch reference
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"features": features})[0]
    return (evaluate(task, outputs, targets), *_latency(lambda row: session.run(None, {"features": row}), features))


def _latency(predict, features: np.ndarray) -> tuple[float, float]:
    rows = [features[i % len(features)][None, :] for i in range(LATENCY_RUNS + 20)]
    for row in rows[:20]:
        predict(row)
    times = []
    for row in rows[20:]:
        started = time.perf_counter()
        predict(row)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _deflated(path: Path) -> int:
    return len(zlib.compress(Path(path).read_bytes(), 6))


def _reference(model: torch.nn.Module, shape: ModelShape, merged_path: Path, features, targets, metric) -> Variant:
    torch.set_num_threads(1)
    with torch.no_grad():
        p50, p99 = _latency(lambda row: model(torch.from_numpy(row)), features.numpy())
    metrics = evaluate(shape.task, predict(model, features).numpy(), targets.numpy())
    return Variant("pytorch_fp32", str(merged_path), metrics[metric], metrics, Path(merged_path).stat().st_size,
                   _deflated(merged_path), p50, p99, True)


def _build_variants(shape: ModelShape, state: dict, sparsity: float, out: Path,
                    calibration: np.ndarray | None) -> dict[str, Path]:
    dense = export_onnx(load_model(shape, state), shape.in_features, out / "fp32.onnx")
    pruned = export_onnx(prune_global(load_model(shape, state), sparsity), shape.in_features, out / "pruned_fp32.onnx")
    variants = {
        "onnx_fp32": dense,
        "onnx_pruned_fp32": pruned,
        "onnx_int8": quantize_int8(dense, out / "int8.onnx"),
        "onnx_pruned_int8": quantize_int8(pruned, out / "pruned_int8.onnx"),
    }
    if calibration is not None and len(calibration):
        try:
            variants["onnx_static_int8"] = quantize_static_int8(dense, out / "static_int8.onnx", calibration)
            variants["onnx_pruned_static_int8"] = quantize_static_int8(pruned, out / "pruned_static_int8.onnx",
                                                                       calibration)
        except Exception as err:  # an op the static quantizer cannot handle: the other variants still compete
            log.warning("static int8 quantization failed (%s: %s); choosing among the other variants",
                        type(err).__name__, err)
            variants.pop("onnx_static_int8", None)
    return variants


def compress(merged_path: Path, merged_sha256: str, shape: ModelShape, eval_data: tuple[torch.Tensor, torch.Tensor],
             stage_dir: Path, metric: str, tolerance: float, sparsity: float,
             calibration: np.ndarray | None = None) -> CompressManifest:
    """Build, score and choose among the compressed variants; the chosen one is `{stage_dir}/model.onnx`.
    `calibration` (encoded training rows) adds the statically quantized variants."""
    state, _ = load_checkpoint(Path(merged_path), merged_sha256)
    features, targets = eval_data
    reference = _reference(load_model(shape, state), shape, Path(merged_path), features, targets, metric)
    x, y = features.numpy(), targets.numpy()
    with atomic_dir(stage_dir) as tmp:
        variants = []
        for name, path in _build_variants(shape, state, sparsity, tmp, calibration).items():
            metrics, p50, p99 = _onnx_scores(path, shape.task, x, y)
            final_path = Path(stage_dir) / path.name
            variants.append(Variant(name, str(final_path), metrics[metric], metrics, path.stat().st_size,
                                    _deflated(path), p50, p99,
                                    worsening(metric, reference.score, metrics[metric]) <= tolerance + 1e-12))
        chosen = _choose(variants, reference)
        shutil.copyfile(tmp / Path(chosen.path).name, tmp / CHOSEN_FILE)
        tradeoff = plots.compression_tradeoff([asdict(v) for v in [reference, *variants]], chosen.name, metric,
                                              tmp / "plots" / "compression_tradeoff.png")
    for v in variants:
        log.info("%-18s %s %.4f  %8d bytes  p50 %.3f ms  p99 %.3f ms%s", v.name, metric, v.score, v.bytes,
                 v.latency_p50_ms, v.latency_p99_ms, "" if v.within_tolerance else "  (outside tolerance)")
    chosen_path = Path(stage_dir) / CHOSEN_FILE
    return CompressManifest(reference, variants, chosen.name, str(chosen_path), sha256_file(chosen_path),
                            metric, tolerance, sparsity, [str(Path(stage_dir) / "plots" / tradeoff.name)])


def _choose(variants: list[Variant], reference: Variant) -> Variant:
    eligible = [v for v in variants if v.within_tolerance]
    if not eligible:
        # the plain fp32 export is the merged model itself; it only misses through export error
        eligible = [min(variants, key=lambda v: abs(v.score - reference.score))]
        log.warning("no variant within tolerance; keeping %s", eligible[0].name)
    return min(eligible, key=lambda v: (v.bytes, v.deflated_bytes, v.latency_p50_ms))
