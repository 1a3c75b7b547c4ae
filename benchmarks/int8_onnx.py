"""ONNX Runtime int8 schemes on a trained model: top-1 agreement with the float model on the
evaluation split, and images/s, on this CPU (the choice behind `export.quantize_onnx`).

    python benchmarks/int8_onnx.py --config configs/digits.py --workdir runs/digits

Schemes: u8s8 (8-bit int8 weights: saturates on x86 without VNNI), u8s8_7bit (the export's
`reduce_range`), u8u8 (uint8 weights), s8s8 (int8 activations too). Each is calibrated as the
export is (`--calibration_batches` training batches) and timed at each `--batches` size,
the schemes alternating round by round, medians of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, as train.py sees it

from shufflenet_jax import sources  # noqa: E402
from shufflenet_jax.data import calibration as calibration_data  # noqa: E402
from shufflenet_jax.interop import export  # noqa: E402


def schemes(q) -> dict[str, dict]:
    u8, s8 = q.QuantType.QUInt8, q.QuantType.QInt8
    return {
        "u8s8": dict(activation_type=u8, weight_type=s8),
        "u8s8_7bit": dict(activation_type=u8, weight_type=s8, reduce_range=True),
        "u8u8": dict(activation_type=u8, weight_type=u8),
        "s8s8": dict(activation_type=s8, weight_type=s8),
    }


def quantized_sessions(model, image_size: int, calibration: list[np.ndarray]) -> dict:
    """An ONNX Runtime session per scheme (and the float file's), dynamic batch, NHWC."""
    import onnxruntime as ort
    from onnxruntime import quantization

    files = {"float": export.to_onnx(model, image_size, None, "nhwc")}
    for name, options in schemes(quantization).items():
        files[name] = export.static_quantize(files["float"], calibration, "nhwc", None, **options)
    options = {"providers": ["CPUExecutionProvider"]}
    return {name: ort.InferenceSession(data, **options) for name, data in files.items()}


def images_per_second(sessions: dict, images: np.ndarray, batch: int, repeats: int) -> dict:
    x = np.ascontiguousarray(images[:batch])
    calls = max(1, 64 // batch)
    rounds = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {"images": x})  # warm-up
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(calls):
                s.run(None, {"images": x})
            rounds[name].append(calls * batch / (time.perf_counter() - start))
    return {name: float(np.median(r)) for name, r in rounds.items()}


def cpu_name() -> str:
    """The CPU's model name and whether it has VNNI, from /proc/cpuinfo (or the machine)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    vnni = " avx512_vnni " in info or " avx_vnni " in info
    return f"{name or platform.machine()} ({'VNNI' if vnni else 'no VNNI'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True, help="a training run (its best model)")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = ConfigFileFlagParser(name="config").parse(args.config)
    model = sources.load_models(config, workdir=args.workdir)["model"]
    batch = config.train.eval_batch_size
    calibration = calibration_data.calibration_images(config, args.calibration_batches, batch)
    images, source = calibration_data.held_out_images(config, 10_000)
    sessions = quantized_sessions(model, config.data.image_size, calibration)
    want = export.reference(model)(images).argmax(-1)
    agreement = {n: float(np.mean(s.run(None, {"images": images})[0].argmax(-1) == want))
                 for n, s in sessions.items()}  # fmt: skip
    speed = {b: images_per_second(sessions, images, b, args.repeats) for b in args.batches}
    print(f"{cpu_name()}; agreement on {len(images)} {source}")
    header = "".join(f" {f'b{b} img/s':>11s}" for b in speed)
    print(f"{'scheme':10s} {'agree':>6s}{header}")
    for name in sessions:
        row = "".join(f" {speed[b][name]:11.0f}" for b in speed)
        print(f"{name:10s} {agreement[name]:6.3f}{row}")
    if args.json:
        out = {"agreement": agreement, "images_per_second": speed, "checked_on": source}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
