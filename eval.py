"""Evaluate a model: `python eval.py --config configs/digits.py --workdir runs/digits`.

Exactly one of --workdir (a training run: its newest checkpoint, and the EMA weights if any),
--checkpoint (a model checkpoint directory, e.g. from shufflenet_jax.interop.convert or
DIR/best/STEP), --torch_weights (a torchvision .pth state_dict) or an exported file (--onnx,
--tflite, --stablehlo: `python -m shufflenet_jax.interop.export`). With --image, classify those
files instead of evaluating a split.
"""

import json

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from shufflenet_jax import classification, evaluation, recalibration, sources
from shufflenet_jax.cli import one_line_errors, parse_flags
from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.process import print_setup, setup_process
from shufflenet_jax.train.checkpoints import CheckpointError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The model and data config.", lock_config=False)
flags.DEFINE_string("workdir", None, "A training workdir.")
flags.DEFINE_string("checkpoint", None, "A model checkpoint directory.")
flags.DEFINE_string("torch_weights", None, "A torchvision ShuffleNet V2 .pth file.")
flags.DEFINE_string("onnx", None, "An exported .onnx file.")
flags.DEFINE_string("tflite", None, "An exported .tflite file.")
flags.DEFINE_string("stablehlo", None, "An exported .jaxexport file.")
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval_split).")
flags.DEFINE_string("json", None, "Write the results as JSON here.")
flags.DEFINE_integer("recalibrate_bn", 0, "Re-estimate BN statistics over N training batches.")
flags.DEFINE_multi_string("image", None, "Classify these image files (repeatable).")
flags.mark_flags_as_required(["config"])


def _table(results: dict) -> str:
    lines = [
        f"{'weights':8s} {'top-1':>7s} {'top-5':>7s} {'loss':>7s} {'examples':>9s} {'img/s':>8s}"
    ]
    for name, m in results.items():
        lines.append(
            f"{name:8s} {m['top1']:7.4f} {m['top5']:7.4f} {m['loss']:7.4f} "
            f"{m['examples']:9d} {m['images_per_second']:8.1f}"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    print_setup(setup_process(kernels=FLAGS.config.model.kernels))
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    config = FLAGS.config
    exported = [f for f in (FLAGS.onnx, FLAGS.tflite, FLAGS.stablehlo) if f]
    with one_line_errors(ValueError, OSError, CheckpointError, ImportError):
        if exported:
            _evaluate_exported(config, exported)
            return
        models = sources.load_models(
            config,
            workdir=FLAGS.workdir,
            checkpoint_dir=FLAGS.checkpoint,
            torch_weights=FLAGS.torch_weights,
            report=print,
        )
        if FLAGS.image:
            names = (
                classification.imagenet_class_names() if config.model.num_classes == 1000 else None
            )
            transform = input_pipeline.EvalTransform(
                config.data.image_size, config.data.eval_resize
            )
            results = classification.classify_images(models["model"], FLAGS.image, transform, names)
            for r in results:
                if "error" in r:
                    print(f"{r['image']}: error: {r['error']}")
                    continue
                print(r["image"])
                for t in r["top"]:
                    print(f"  {t['probability']:7.2%}  {t['class']:4d}  {t['name']}")
            failed = any("error" in r for r in results)
        else:
            split = evaluation.eval_split(config, FLAGS.split)
            if FLAGS.recalibrate_bn:
                models = recalibration.recalibrate_models(models, config, FLAGS.recalibrate_bn)
            results = {
                name: evaluation.evaluate_model(model, config, split)[0]
                for name, model in models.items()
            }
            print(f"{config.data.dataset}/{split.split}")
            print(_table(results))
            failed = False
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed:
        raise SystemExit(1)


def _evaluate_exported(config, files: list[str]) -> None:
    """Evaluate one exported model file on the split, as a checkpoint is."""
    if len(files) > 1 or FLAGS.workdir or FLAGS.checkpoint or FLAGS.torch_weights:
        raise ValueError(
            "give exactly one of --workdir, --checkpoint, --torch_weights, "
            "--onnx, --tflite, --stablehlo"
        )
    if FLAGS.image or FLAGS.recalibrate_bn:
        raise ValueError("an exported file is evaluated on a split (no --image, --recalibrate_bn)")
    split = evaluation.eval_split(config, FLAGS.split)
    results = {"exported": evaluation.evaluate_exported(files[0], config, split)}
    print(f"weights: the exported file {files[0]}")
    print(f"{config.data.dataset}/{split.split}")
    print(_table(results))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
