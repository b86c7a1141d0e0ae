"""Could DNSMOS cost less than the ASR? Its fp32 model at this CPU's peak, against an int8 copy, in one run.

    uv run --with onnx==1.23.2 python benchmarks/bench_dnsmos_int8.py

(`onnx` is what onnxruntime's quantizer needs; the project does not depend on it.) The primary model
(`sig_bak_ovr.onnx`) is a CNN over the log power spectrum of 9.01 s: its multiply-adds per window are counted from the
graph's Conv weights and output sizes, and one window is timed on one thread, giving GFLOP/s (near the core's fp32
peak means no fp32 runtime does much better) and the seconds an audio hour costs when every second of speech is in
exactly one window, the floor of any windowing. The int8 copy is onnxruntime's static quantization (per-channel
weights, the two STFT convolutions and the first 2-D one kept in fp32, calibrated on half of the demo speakers' clips);
on the other half it reports its time per window and how far SIG/BAK/OVRL move from the fp32 model's. Prints one
JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batched_scorers import demo_speaker_clips  # noqa: E402

from higgs_pipeline.speech import dnsmos  # noqa: E402

WINDOW_SECONDS = dnsmos.WINDOW_SAMPLES / dnsmos.DNSMOS_RATE
KEPT_FP32 = 3  # the STFT's two 1-D convolutions and the first 2-D one: quantizing these moved OVRL by ~0.8


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options)


def multiply_adds(path: str, window: np.ndarray) -> int:
    """Multiply-adds of the model's convolutions for one window (the dense layers are negligible)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for node in convs:  # expose each conv's output to read its size
        model.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    session = ort.InferenceSession(model.SerializeToString())
    names = [node.output[0] for node in convs]
    outputs = session.run(names, {"input_1": window[None]})
    return sum(out.size * int(np.prod(weights[node.input[1]][1:])) for node, out in zip(convs, outputs, strict=True))


def quantized(path: str, calibration: list[np.ndarray], folder: str) -> str:
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, out = f"{folder}/prepared.onnx", f"{folder}/int8.onnx"
    quant_pre_process(path, prepared)
    convs = [node.name for node in onnx.load(prepared).graph.node if node.op_type == "Conv"]

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.feed = iter({"input_1": window[None]} for window in calibration)

        def get_next(self):
            return next(self.feed, None)

    q.quantize_static(
        prepared, out, Reader(), quant_format=q.QuantFormat.QOperator, per_channel=True,
        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, op_types_to_quantize=["Conv"],
        nodes_to_exclude=convs[:KEPT_FP32],
    )  # fmt: skip
    return out


def seconds_per_window(session, window: np.ndarray, rounds: int = 5) -> float:
    session.run(None, {"input_1": window[None]})
    started = time.perf_counter()
    for _ in range(rounds):
        session.run(None, {"input_1": window[None]})
    return (time.perf_counter() - started) / rounds


def scores(session, windows: list[np.ndarray]) -> np.ndarray:
    """(windows, 3): SIG, BAK, OVRL after speechmos's polynomial fit."""
    raw = np.concatenate([session.run(None, {"input_1": window[None]})[0] for window in windows])
    return np.stack(dnsmos._model().get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], False), axis=1)


def main() -> int:
    from speechmos import dnsmos as speechmos

    path = str(Path(speechmos.__file__).parent / "dnsmos_models" / "sig_bak_ovr.onnx")
    windows = [dnsmos._windows(np.clip(clip, -1.0, 1.0))[0] for clip in demo_speaker_clips()]
    calibration, heard = windows[::2], windows[1::2]
    fp32 = _session(path)
    per_window = seconds_per_window(fp32, heard[0])
    flops = 2 * multiply_adds(path, heard[0])
    with tempfile.TemporaryDirectory() as folder:
        int8 = _session(quantized(path, calibration, folder))
        int8_per_window = seconds_per_window(int8, heard[0])
        shift = scores(int8, heard) - scores(fp32, heard)
    print(json.dumps({
        "gflop_per_window": round(flops / 1e9, 2),
        "fp32_seconds_per_window": round(per_window, 3),
        "fp32_gflop_per_second": round(flops / 1e9 / per_window, 1),
        "fp32_floor_seconds_per_audio_hour": round(per_window * 3600 / WINDOW_SECONDS, 1),
        "int8_seconds_per_window": round(int8_per_window, 3),
        "int8_speed_up": round(per_window / int8_per_window, 2),
        "windows_compared": len(heard),
        "mean_abs_shift_sig_bak_ovrl": np.abs(shift).mean(axis=0).round(3).tolist(),
        "max_abs_shift_sig_bak_ovrl": np.abs(shift).max(axis=0).round(3).tolist(),
        "mean_signed_shift_sig_bak_ovrl": shift.mean(axis=0).round(3).tolist(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
