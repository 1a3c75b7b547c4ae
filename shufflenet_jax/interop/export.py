"""Export a model for deployment, and check the exported file against the JAX model.

    python -m shufflenet_jax.interop.export --checkpoint DIR --format onnx --out model.onnx
    python -m shufflenet_jax.interop.export --torch_weights W.pth --format tflite --out m.tflite
    python -m shufflenet_jax.interop.export --random_width 0.5 --format stablehlo --out m.jaxexport

Formats: `stablehlo` (`jax.export`: one file for cpu, cuda and tpu, XLA's operations only,
weights embedded; loading it needs only jax), `onnx` (ONNX Runtime; `onnx_graph`), `tflite`
(LiteRT, through `jax2tf` and TensorFlow's converter). Every export runs the written file once
on a fixed input (an int8 file: on held-out images of its calibration config) and reports its
largest logit difference from the JAX model. All formats
compute the BatchNorm-folded model with XLA's convolution operations (`EXPORT_IMPL`); the C++
kernels of this package are never exported (nothing could run them elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflenet_jax import ops
from shufflenet_jax.cli import add_torch_weights
from shufflenet_jax.model.folded import fold_batchnorm
from shufflenet_jax.model.inference import predictor
from shufflenet_jax.model.layers import Impl
from shufflenet_jax.model.network import (
    ShuffleNetV2,
    abstract_model,
    check_expected,
    check_width,
    with_values,
)

EXPORT_IMPL = Impl(
    dense=ops.conv_lax,
    depthwise=ops.depthwise_lax,
    pointwise=ops.pointwise_lax,
    fused_inference=False,
)
SUFFIXES = {"stablehlo": ".jaxexport", "onnx": ".onnx", "tflite": ".tflite"}
INSTALL_HINT = 'pip install -e ".[export]"'
Predict = Callable[[np.ndarray], np.ndarray]


def require(module: str) -> Any:
    """Import a converter package, or fail in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"exporting needs {module.split('.')[0]}: {INSTALL_HINT}") from e


def export_model(model: ShuffleNetV2) -> ShuffleNetV2:
    """`model`'s weights in an inference copy made of XLA's convolution ops, BatchNorm folded:
    what every format computes. Non-finite weights are an error naming the first."""
    abstract = abstract_model(model.width, model.num_classes, impl=EXPORT_IMPL)
    copy = with_values(abstract, nnx.to_pure_dict(nnx.state(model)))
    copy.eval()
    return fold_batchnorm(copy)


def _function(model: ShuffleNetV2) -> Callable[[jax.Array], jax.Array]:
    """images -> logits with the weights as constants (exports embed them)."""
    graphdef, state = nnx.split(export_model(model))
    return lambda images: nnx.merge(graphdef, state)(images)


def to_stablehlo(model: ShuffleNetV2, image_size: int, batch: int | None) -> bytes:
    """A serialized `jax.export.Exported` for cpu, cuda and tpu (`batch` None: symbolic)."""
    from jax import export

    b = export.symbolic_shape("batch")[0] if batch is None else batch
    spec = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    exported = export.export(jax.jit(_function(model)), platforms=("cpu", "cuda", "tpu"))(spec)
    return bytes(exported.serialize())


def to_onnx(model: ShuffleNetV2, image_size: int, batch: int | None, layout: str) -> bytes:
    """The ONNX graph of `onnx_graph`, serialized."""
    require("onnx")
    from shufflenet_jax.interop import onnx_graph

    graph = onnx_graph.to_onnx(export_model(model), image_size, batch, layout)
    return graph.SerializeToString()


def to_tflite(
    model: ShuffleNetV2, image_size: int, batch: int, calibration: list[np.ndarray] | None = None
) -> bytes:
    """A LiteRT flatbuffer through jax2tf's native serialization and TensorFlow's converter;
    static batch (a symbolic one does not survive TensorFlow 2.21's deserializer). With
    `calibration` images, int8 weights and activations (float32 in and out)."""
    tf = require("tensorflow")
    from jax.experimental import jax2tf

    spec = tf.TensorSpec((batch, image_size, image_size, 3), tf.float32)
    fn = tf.function(
        jax2tf.convert(_function(model), with_gradient=False),
        input_signature=[spec],
        autograph=False,
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x] for x in _chunks(calibration, batch))
    return converter.convert()


def _chunks(calibration: list[np.ndarray], batch: int | None):
    """The calibration images in whole batches of a static `batch` (None: as given)."""
    for x in calibration:
        step = batch or len(x)
        yield from (x[i : i + step] for i in range(0, len(x) - step + 1, step))


def quantize_onnx(
    data: bytes, calibration: list[np.ndarray], layout: str, batch: int | None
) -> bytes:
    """ONNX Runtime's static int8 quantization (QDQ, per-channel 7-bit weights in [-64, 64],
    uint8 activations) calibrated on NHWC `calibration` batches (in chunks of a static `batch`).

    7-bit weights (`reduce_range`) because x86 CPUs without VNNI (AVX2-only, and AVX-512
    before Cascade Lake) run ONNX Runtime's uint8 x int8 products with an instruction that
    adds them in pairs into int16 and saturates there: 255 * (127 + 127) overflows 32,767,
    255 * (64 + 64) cannot (`u8s8_pair_sum_bound`). Full-range weights classify a third of the
    digits wrongly on such a CPU; uint8 weights (U8U8) are as accurate and slower
    (docs/deployment.md)."""
    q = require("onnxruntime.quantization").QuantType
    quantized = static_quantize(
        data, calibration, layout, batch,
        reduce_range=True, activation_type=q.QUInt8, weight_type=q.QInt8,
    )  # fmt: skip
    if u8s8_pair_sum_bound(quantized) > INT16_MAX:
        raise ValueError("the int8 weights exceed 7 bits: wrong on x86 CPUs without VNNI")
    return quantized


def static_quantize(
    data: bytes, calibration: list[np.ndarray], layout: str, batch: int | None, **options: Any
) -> bytes:
    """`onnxruntime.quantization.quantize_static` (QDQ, per channel, and `options`) of a
    serialized model, calibrated on NHWC `calibration` batches: the export's scheme is
    `quantize_onnx`; others are for comparing schemes (benchmarks/int8_onnx.py)."""
    quantization = require("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _chunks(calibration, batch)

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            if x is None:
                return None
            return {"images": x if layout == "nhwc" else x.transpose(0, 3, 1, 2)}

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(data)
        quantization.quantize_static(
            source,
            target,
            Reader(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            **options,
        )
        return target.read_bytes()


INT16_MAX = 2**15 - 1


def u8s8_pair_sum_bound(data: bytes) -> int:
    """The largest magnitude a pair of uint8-activation x int8-weight products can reach in a
    serialized ONNX model: 255 * 2 * the largest |int8 weight| (0 without int8 weights).
    Above `INT16_MAX`, ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI saturate."""
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    largest = [int(np.abs(w.astype(np.int32)).max()) for w in weights if w.dtype == np.int8]
    return 255 * 2 * max(largest, default=0)


def load(path: str | Path) -> Predict:
    """An exported file as `logits = predict(images)` on NHWC float32 NumPy images of any
    batch (a static batch is run in chunks), the format known from the suffix (`SUFFIXES`)."""
    path = Path(path)
    fmt = {v: k for k, v in SUFFIXES.items()}.get(path.suffix)
    if fmt is None:
        raise ValueError(f"{path}: unknown suffix; exports end in {', '.join(SUFFIXES.values())}")
    data = path.read_bytes()
    if fmt == "stablehlo":
        from jax import export

        exported = export.deserialize(bytearray(data))
        run = lambda images: np.asarray(exported.call(jnp.asarray(images)))  # noqa: E731
        predict, shape = _any_batch(run, exported.in_avals[0].shape[0]), exported.in_avals[0].shape
    elif fmt == "onnx":
        predict, shape = _onnx_predict(data)
    else:
        predict, shape = _tflite_predict(data)
    return _sized(predict, tuple(int(d) for d in shape[1:3]), path)


def _sized(predict: Predict, size: tuple[int, int], path: Path) -> Predict:
    """`predict`, refusing in one line images of another size than the file's input."""

    def checked(images: np.ndarray) -> np.ndarray:
        if tuple(images.shape[1:3]) != size:
            raise ValueError(
                f"{path} takes {size[0]}x{size[1]} images, not {images.shape[1]}x"
                f"{images.shape[2]}: export it with --image_size {images.shape[1]}, or evaluate "
                f"with a config of size {size[0]}"
            )
        return predict(images)

    return checked


def _any_batch(run: Predict, static: Any) -> Predict:
    """`run` for any batch: in chunks of its static batch, the last one padded."""
    if not isinstance(static, int):
        return run

    def predict(images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.concatenate([images, np.zeros((-n % static, *images.shape[1:]), images.dtype)])
        chunks = [run(padded[i : i + static]) for i in range(0, len(padded), static)]
        return np.concatenate(chunks)[:n]

    return predict


def _onnx_predict(data: bytes) -> tuple[Predict, list]:
    ort = require("onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    nchw = session.get_inputs()[0].shape[1] == 3

    def run(images: np.ndarray) -> np.ndarray:
        x = images.transpose(0, 3, 1, 2) if nchw else images
        return session.run(None, {"images": np.ascontiguousarray(x, np.float32)})[0]

    shape = session.get_inputs()[0].shape
    return _any_batch(run, shape[0]), [shape[0], *shape[2:4]] if nchw else shape


def _tflite_predict(data: bytes) -> tuple[Predict, list]:
    interpreter = require("ai_edge_litert.interpreter").Interpreter(model_content=data)
    interpreter.allocate_tensors()
    (given,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(images: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(given["index"], np.asarray(images, np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return _any_batch(run, int(given["shape"][0])), list(given["shape"])


def reference(model: ShuffleNetV2) -> Predict:
    """The JAX model's inference (`model.inference.predictor`, running statistics) on NumPy
    images: what an export must reproduce."""
    predict = predictor(model)
    return lambda images: np.asarray(predict(jnp.asarray(images)))


def check_input(image_size: int, batch: int, seed: int = 0) -> np.ndarray:
    """The fixed NHWC input every export is checked on: standardized-image-like noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)


def tolerance(logits: np.ndarray) -> float:
    """The largest float32 logit difference an export may show: 1e-4 of the logits' scale
    (at least 1). Layers folded and summed in another order differ by rounding, about 1e-6
    of the scale at these depths; a wrong layer differs by the scale itself."""
    return 1e-4 * max(1.0, float(np.abs(logits).max()))


def export(
    model: ShuffleNetV2,
    fmt: str,
    out: str | Path,
    *,
    image_size: int = 224,
    batch: int | None = 1,
    layout: str = "nhwc",
    calibration: list[np.ndarray] | None = None,
    check_images: np.ndarray | None = None,
    check_source: str = "held-out images",
) -> dict[str, Any]:
    """Write `model` to `out` in format `fmt` (`batch` None: dynamic; `calibration` images:
    int8) and compare the file's logits with the JAX model's on `check_images` (real NHWC
    images, described by `check_source`), else on `check_input`'s fixed noise. A float export
    beyond `tolerance` is an error; the top-1 agreement is reported only on real images."""
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
    if fmt == "stablehlo" and calibration is not None:
        raise ValueError("int8 is for the onnx and tflite formats")
    if fmt == "tflite" and batch is None:
        raise ValueError("a LiteRT export has a static batch: give --batch N")
    for images in [*(calibration or [])[:1], *([] if check_images is None else [check_images])]:
        if images.shape[1:3] != (image_size, image_size):
            raise ValueError(
                f"the data's images are {images.shape[1]}x{images.shape[2]}, the export's input "
                f"{image_size}x{image_size}: give --image_size {images.shape[1]} or a config "
                f"of size {image_size}"
            )
    if fmt == "onnx":
        data = to_onnx(model, image_size, batch, layout)
        data = data if calibration is None else quantize_onnx(data, calibration, layout, batch)
    elif fmt == "tflite":
        data = to_tflite(model, image_size, batch, calibration)
    else:
        data = to_stablehlo(model, image_size, batch)
    Path(out).write_bytes(data)
    real = check_images is not None
    x = check_images if real else check_input(image_size, batch or 3)
    want, got = reference(model)(x), load(out)(x)
    report = {
        "format": fmt,
        "path": str(out),
        "bytes": len(data),
        "batch": batch,
        "int8": calibration is not None,
        "checked_on": f"{len(x)} {check_source if real else 'fixed random input'}"
        + ("" if real or len(x) == 1 else "s"),
        "max_abs_diff": float(np.abs(got - want).max()),
        "tolerance": tolerance(want),
        "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))) if real else None,
    }
    if calibration is None and not report["max_abs_diff"] <= report["tolerance"]:
        raise ValueError(
            f"{out} differs from the JAX model by {report['max_abs_diff']:.3g} "
            f"(more than {report['tolerance']:.3g}): not a faithful export"
        )
    return report


def describe(report: dict[str, Any]) -> str:
    """The one line the CLI prints about a written file and what it was checked on."""
    kind = f"{report['format']}{', int8' if report['int8'] else ''}"
    line = (
        f"wrote {report['path']} ({report['bytes'] / 2**20:.2f} MiB, {kind}): on "
        f"{report['checked_on']}, max |logit difference| from the JAX model "
        f"{report['max_abs_diff']:.3g}"
    )
    if report["top1_agreement"] is not None:
        line += f", top-1 agreement {report['top1_agreement']:.1%}"
    elif report["int8"]:
        line += " (no top-1 agreement: measured on real images only)"
    return line


def _load_model(args: argparse.Namespace) -> tuple[ShuffleNetV2, int]:
    """The model the flags name and its image size: --image_size, else the size a checkpoint
    records it was trained at (a training run's best model, or converted weights: 224)."""
    trained_at = 224
    if args.checkpoint:
        from shufflenet_jax.model.model_file import read_model_config, restore_model

        model = restore_model(args.checkpoint, args.width, args.num_classes)
        trained_at = read_model_config(args.checkpoint).get("image_size", 224)
    elif args.torch_weights:
        from shufflenet_jax.interop.convert import load_torchvision

        model = load_torchvision(args.torch_weights, args.width, args.num_classes)
    else:
        width, classes = check_width(args.random_width), args.num_classes or 1000
        check_expected("--random_width", width, classes, args.width)
        model = ShuffleNetV2(width, classes, rngs=nnx.Rngs(args.seed))
    return model, args.image_size or trained_at


def _data(args: argparse.Namespace) -> dict[str, Any]:
    """With --int8: the calibration config's training images to calibrate on and up to
    --check_images of its evaluation split to check the file on."""
    if not args.int8:
        return {}
    if args.calibration_config is None:
        raise ValueError("--int8 needs --calibration_config CONFIG (its training images)")
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    from shufflenet_jax.data import calibration

    config = ConfigFileFlagParser(name="calibration_config").parse(args.calibration_config)
    batch = config.train.eval_batch_size
    images, source = calibration.held_out_images(config, args.check_images)
    return {
        "calibration": calibration.calibration_images(config, args.calibration_batches, batch),
        "check_images": images,
        "check_source": source,
    }


def main(argv: Sequence[str] | None = None) -> None:
    # TensorFlow's converter logs C++ warnings about options jax2tf's graph never sets; this
    # program's own line says what was written
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="a model checkpoint, or a training run (its best)"
    )
    add_torch_weights(source, help="torchvision weights (.pth)")
    source.add_argument("--random_width", help="random weights of this width (0.5 ... 2.0)")
    parser.add_argument("--width", help="expected width (checked against the weights)")
    parser.add_argument("--num_classes", type=int, help="expected (with --random_width: chosen)")
    parser.add_argument("--seed", type=int, default=0, help="with --random_width: their seed")
    parser.add_argument("--format", required=True, choices=list(SUFFIXES))
    parser.add_argument("--out", required=True, metavar="FILE")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch (default 1)")
    batch.add_argument("--dynamic_batch", action="store_true", help="stablehlo and onnx only")
    parser.add_argument(
        "--image_size", type=int, help="default: the size the checkpoint was trained at, or 224"
    )
    parser.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc", help="onnx input")
    parser.add_argument("--int8", action="store_true", help="onnx and tflite: int8 weights")
    parser.add_argument("--calibration_config", metavar="CONFIG", help="its training images")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument(
        "--check_images", type=int, default=1000, help="with --int8: held-out images checked"
    )
    args = parser.parse_args(argv)
    try:
        model, image_size = _load_model(args)
        report = export(
            model,
            args.format,
            args.out,
            image_size=image_size,
            batch=None if args.dynamic_batch else args.batch,
            layout=args.layout,
            **_data(args),
        )
    except (ValueError, ImportError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(describe(report))


if __name__ == "__main__":
    main()
