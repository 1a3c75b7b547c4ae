"""Train ShuffleNet V2: `python train.py --config configs/digits.py --workdir runs/digits`.

Any config field can be overridden by section, e.g. `--config.train.total_steps=200
--config.optim.base_learning_rate=0.05`. A workdir with checkpoints resumes from the newest good
one. Multi-host: the same command on every host; under SLURM, Open MPI, Kubernetes (JAX's
[k8s] extra) or on a Cloud TPU slice the processes find each other from the environment
(`process.cluster_environment`); elsewhere pass `--coordinator_address host:port
--num_processes N --process_id I` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), which also win over a cluster's environment.

`--compile_for TARGET` (h100, h100x8, h200, h200x8, v5e:2x2, v6e:2x2) compiles this config's
train and eval steps for that accelerator on this machine, without one, and reports memory,
kernels and an estimated bound (`shufflenet_jax.aot`); `--json OUT`, `--max_batch`, `--save FILE`.
"""

import json
import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from shufflenet_jax.cli import one_line_errors, parse_flags
from shufflenet_jax.process import print_setup, setup_process
from shufflenet_jax.train.checkpoints import CheckpointError
from shufflenet_jax.train.loop import train_and_evaluate
from shufflenet_jax.train.workdir import WorkdirError

FLAGS = flags.FLAGS


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if os.environ.get(name) else None


config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-host training.",
)
flags.DEFINE_integer(
    "num_processes", _env_int("JAX_NUM_PROCESSES"), "Number of processes (with the address)."
)
flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"), "This process's index.")
flags.DEFINE_string("compile_for", None, "Compile for this accelerator instead of training.")
flags.DEFINE_string("json", None, "With --compile_for: write the report here.")
flags.DEFINE_bool("max_batch", False, "With --compile_for: find the largest batch that fits.")
flags.DEFINE_string("save", None, "With --compile_for: write the compiled steps here.")
flags.mark_flags_as_required(["config"])


def _progress(line: str) -> None:
    print(line, flush=True)


def compile_only() -> None:
    """--compile_for: compile for a described accelerator; nothing is read or written but the
    report and the saved executables."""
    jax.config.update("jax_platforms", "cpu")  # a plugin without its device must not start
    from shufflenet_jax.aot import compile as aot
    from shufflenet_jax.aot import targets

    aot.without_persistent_cache()

    with one_line_errors(ValueError):
        target = targets.get(FLAGS.compile_for)
        out, executables = aot.compile_for(FLAGS.config, target, FLAGS.max_batch, _progress)
    print(aot.describe(out, target))
    if FLAGS.save:
        aot.write_executables(FLAGS.save, executables, target.devices)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=1)


def main(argv):
    del argv
    if FLAGS.compile_for:
        return compile_only()
    if not FLAGS.workdir:
        raise SystemExit("error: --workdir is required (or --compile_for TARGET)")
    with one_line_errors(ValueError, RuntimeError):  # e.g. an address without a process count
        lines = setup_process(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            kernels=FLAGS.config.model.kernels,
        )
    print_setup(lines)
    if not FLAGS["verbosity"].present:  # orbax and grain log every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    errors = (ValueError, FloatingPointError, OSError, CheckpointError, WorkdirError)
    with one_line_errors(*errors):
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    step = int(result.state.step)
    if jax.process_index() == 0:
        if result.eval_metrics is not None:
            print(f"final eval: top-1 {result.eval_metrics['top1']:.4f}")
        elif not result.stopped_by_signal and step >= FLAGS.config.train.total_steps:
            print(f"{FLAGS.workdir} is already at step {step}: nothing to do")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
