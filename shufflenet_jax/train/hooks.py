"""What the training loop does besides stepping, each at its own cadence: the non-finite loss
check, progress lines, evaluation, checkpoints; and the signal handler that stops it.

A hook is called as `hook(step, state, metrics, last)` after every step (`last`: the loop
ends after this step) and closed when the loop ends; `hook.due(step, last)` states its cadence,
once, and acts only then. The loss check has none of its own: it runs whenever any hook it
guards is due, before they log, evaluate or save.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from shufflenet_jax.model import model_file
from shufflenet_jax.train import checkpoints, optim
from shufflenet_jax.train.state import TrainState

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its step, saves and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: finishing the current step, then saving", signum)
        self.signal = signum

    def requested(self, in_flight: Any = None) -> bool:
        """Whether any process got a signal. With several processes this is a collective: it
        first waits for `in_flight` (the step just dispatched), because XLA:CPU runs programs
        asynchronously and two processes could otherwise pair the step's gloo collectives with
        this one's in different orders and deadlock (seen in the two-process test)."""
        flag = np.array(self.signal is not None)
        if jax.process_count() > 1:  # every process must stop at the same step
            jax.block_until_ready(in_flight)
            flag = np.any(multihost_utils.process_allgather(flag))
        return bool(flag)


class MetricsLog:
    """Console lines, TensorBoard scalars and `metrics.jsonl` (written by process 0 only)."""

    def __init__(self, workdir: Path) -> None:
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, float], line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        self._jsonl.write(json.dumps({"event": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            if isinstance(v, int | float):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def check_cadences(config: Any) -> None:
    """An error naming the first cadence of `config.train` that is not a positive step count."""
    for name in ("log_every", "eval_every", "checkpoint_every", "total_steps"):
        value = config.train[name]
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.train.{name} must be a positive number of steps, got {value}")


def every(step: int, steps: int, last: bool) -> bool:
    """Whether a cadence of `steps` steps is due: at its multiples and at the last step."""
    return step % steps == 0 or last


class LossCheck:
    """Raises FloatingPointError at the first non-finite loss, checked whenever one of the
    `guarded` hooks is due (before anything logs, evaluates or saves), so no non-finite state
    is written; the error says which checkpoint is the last good one (`latest_step()`), if any."""

    def __init__(self, guarded: list[Any], checkpoint_dir: Path, latest_step: Callable) -> None:
        self.guarded, self.checkpoint_dir, self.latest_step = guarded, checkpoint_dir, latest_step
        self.pending: list[tuple[int, jax.Array]] = []

    def due(self, step: int, last: bool) -> bool:
        return any(hook.due(step, last) for hook in self.guarded)

    def __call__(self, step: int, state: TrainState, metrics: dict, last: bool) -> None:
        self.pending.append((step, metrics["loss"]))
        if not self.due(step, last):
            return
        pending, self.pending = self.pending, []
        for at, loss in pending:
            value = float(loss)
            if not math.isfinite(value):
                good = self.latest_step()
                kept = (
                    f"the last good checkpoint, step {good} in {self.checkpoint_dir}, is kept"
                    if good is not None
                    else "no checkpoint had been written"
                )
                raise FloatingPointError(f"non-finite training loss {value} at step {at}; {kept}")

    def close(self) -> None:
        pass


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """A train line (loss, top-1, learning rate, epoch, images/s, ETA) every `log_every` steps."""

    def __init__(self, config: Any, metrics_log: MetricsLog, train_examples: int) -> None:
        self.config, self.metrics_log = config, metrics_log
        self.steps_per_epoch = train_examples / config.train.batch_size
        self.lr_at = optim.schedule(config)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.first = True

    def due(self, step: int, last: bool) -> bool:
        return every(step, self.config.train.log_every, last)

    def __call__(self, step: int, state: TrainState, metrics: dict, last: bool) -> None:
        first, self.first = self.first, False
        t = self.config.train
        if first and not self.due(step, last):  # its time is mostly compilation: the rate
            self.window_start = time.perf_counter()  # and the ETA start after it
            return
        self.window_steps += 1
        if not self.due(step, last):
            return
        elapsed = time.perf_counter() - self.window_start
        ips = self.window_steps * t.batch_size / max(elapsed, 1e-9)
        values = {
            "loss": float(metrics["loss"]),
            "top1": float(metrics["top1"]),
            "lr": float(self.lr_at(max(step - 1, 0) // self.config.optim.grad_accum_steps)),
            "epoch": step / self.steps_per_epoch,
            "images_per_second": ips,
        }
        eta = (t.total_steps - step) * t.batch_size / max(ips, 1e-9)
        self.metrics_log.write(
            "train",
            step,
            values,
            f"step {step}/{t.total_steps} epoch {values['epoch']:.2f} "
            f"loss {values['loss']:.4f} top-1 {values['top1']:.3f} "
            f"lr {values['lr']:.4g} {ips:.1f} img/s "
            + ("(the first step, compiling)" if first else f"ETA {_format_eta(eta)}"),
        )
        self.window_start, self.window_steps = time.perf_counter(), 0

    def close(self) -> None:
        pass


class Evaluate:
    """Evaluates the weights (and the EMA's) every `eval_every` steps and at the end, logs the
    result and keeps the best model by top-1 in `best/`."""

    def __init__(
        self,
        config: Any,
        evaluate: Callable[[nnx.State, nnx.State], dict[str, float]],
        graphdef: nnx.GraphDef,
        metrics_log: MetricsLog,
        best_dir: Path,
    ) -> None:
        self.config, self.evaluate, self.graphdef = config, evaluate, graphdef
        self.metrics_log = metrics_log
        self.best = checkpoints.checkpoint_manager(best_dir, 1, best=True)
        self.metrics: dict[str, float] | None = None

    def due(self, step: int, last: bool) -> bool:
        t = self.config.train  # not at a stop by signal: only the run's own end evaluates
        return step % t.eval_every == 0 or (step == t.total_steps and t.eval_at_end)

    def __call__(self, step: int, state: TrainState, metrics: dict, last: bool) -> None:
        if not self.due(step, last):
            return
        result = self.evaluate(state.params, state.batch_stats)
        if state.ema_params is not None:
            ema = self.evaluate(state.ema_params, state.batch_stats)
            result.update({f"ema_{k}": v for k, v in ema.items() if k != "examples"})
        self.metrics_log.write(
            "eval",
            step,
            result,
            f"eval  step {step}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
            f"loss {result['loss']:.4f} ({result['examples']} examples)",
        )
        model = nnx.merge(self.graphdef, state.params, state.batch_stats)
        saved = self.best.save(
            step,
            args=model_file.model_save_args(
                model, source=f"training step {step}", image_size=self.config.data.image_size
            ),
            metrics={"top1": result["top1"]},
        )
        if not saved:  # a resumed run re-evaluating a step that best/ already has
            log.warning("best/ already holds step %d or later: this evaluation is not saved", step)
        self.metrics = result

    def close(self) -> None:
        self.best.wait_until_finished()
        self.best.close()


class Checkpoint:
    """Saves the state and the data position every `checkpoint_every` steps and at the last;
    a background save that failed is an error at the next step."""

    def __init__(self, config: Any, manager: Any, data_iter: Any) -> None:
        self.config, self.manager, self.data_iter = config, manager, data_iter

    def due(self, step: int, last: bool) -> bool:
        return every(step, self.config.train.checkpoint_every, last)

    def __call__(self, step: int, state: TrainState, metrics: dict, last: bool) -> None:
        checkpoints.check_saves(self.manager)
        if self.due(step, last):
            checkpoints.save(self.manager, step, state, self.config, self.data_iter)

    def close(self) -> None:
        try:
            checkpoints.check_saves(self.manager, wait=True)
        finally:
            self.manager.close()
