"""Training never loses or corrupts work: checkpoint integrity, the workdir lock, guards
against empty batches and non-finite values, failed saves, and one-line errors. Each test
reproduces the failure it guards against (docs/reliability.md lists them)."""

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import ShuffleNetV2
from shufflenet_jax.model import model_file
from shufflenet_jax.train import checkpoints, workdir
from shufflenet_jax.train.loop import train_and_evaluate

from .helpers import RUN_LIMIT_S
from .test_training import ROOT, losses, run_train, small_config, start_training


def step_dirs(directory):
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def largest_file(directory):
    return max(
        (f for f in Path(directory).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )


def unusable_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]


@pytest.mark.os_level
@pytest.mark.parametrize("damage", ["truncate", "garbage_metadata"])
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_saving_goes_on(
    damage, digits_data_dir, tmp_path, caplog
):
    """Before: the corrupt step 4 stayed, so orbax refused every later save of steps <= 4."""
    config = small_config(digits_data_dir, total_steps=8, checkpoint_every=2)
    train_and_evaluate(config, tmp_path, stop_after=4)
    ckpts = tmp_path / "checkpoints"
    if damage == "truncate":
        f = largest_file(ckpts / "4" / "state")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
        (ckpts / "4" / "meta" / "metadata").write_text("{ not json")
    caplog.set_level(logging.WARNING)
    result = train_and_evaluate(config, tmp_path, stop_after=6)
    (warning,) = unusable_warnings(caplog)
    assert "checkpoint 4" in warning and "moved to" in warning and "\n" not in warning
    assert (ckpts / "corrupt" / "4").is_dir()  # kept for inspection, never deleted
    assert int(result.state.step) == 6 and step_dirs(ckpts) == [4, 6]  # keep_checkpoints=2
    assert int(checkpoints.latest_weights(config, tmp_path)["step"]) == 6


@pytest.mark.os_level
def test_flipped_bytes_in_a_checkpoint_fail_its_digest(digits_data_dir, tmp_path, caplog):
    """Before: bytes flipped inside a data file (size unchanged) restored silently."""
    config = small_config(digits_data_dir, total_steps=4, checkpoint_every=2)
    train_and_evaluate(config, tmp_path, stop_after=4)
    f = largest_file(tmp_path / "checkpoints" / "4" / "state")
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    f.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    manager = checkpoints.checkpoint_manager(tmp_path / "checkpoints", 2)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        state = checkpoints.restore_latest(manager, config, device)  # train.py's way in
    finally:
        manager.close()
    assert int(state.step) == 2
    (warning,) = unusable_warnings(caplog)
    assert "checkpoint 4" in warning and "does not match its recorded digest" in warning


def test_digests_name_the_changed_or_non_finite_array():
    state = {"a": jnp.ones(3), "b": {"c": jnp.zeros(2)}}
    recorded = checkpoints.digests(state)
    checkpoints.verify(state, recorded)
    with pytest.raises(checkpoints.CheckpointError, match=r"\['b'\]\['c'\] does not match"):
        checkpoints.verify({"a": jnp.ones(3), "b": {"c": jnp.ones(2)}}, recorded)
    with pytest.raises(checkpoints.CheckpointError, match=r"\['a'\] holds non-finite"):
        checkpoints.verify({"a": jnp.full(3, jnp.nan), "b": {"c": jnp.zeros(2)}}, None)


def test_a_refused_save_is_an_error_not_a_silent_skip(tmp_path, digits_data_dir):
    """Before: orbax declined a save of a step older than its newest and said nothing."""
    config = small_config(digits_data_dir)
    manager = checkpoints.checkpoint_manager(tmp_path, 3)
    state = {"x": jnp.ones(2)}
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    try:
        checkpoints.save(manager, 5, state, config, data_iter)
        manager.wait_until_finished()
        with pytest.raises(checkpoints.CheckpointError, match="refused to save step 3"):
            checkpoints.save(manager, 3, state, config, data_iter)
    finally:
        manager.close()


@pytest.mark.os_level
def test_a_second_writer_on_a_workdir_is_refused_naming_the_holder(digits_data_dir, tmp_path):
    """Before: two runs on one workdir crashed one of them at its first save, or both 'finished'
    while overwriting each other's checkpoints and interleaving metrics.jsonl."""
    first = start_training(tmp_path, digits_data_dir)
    second = run_train(tmp_path, digits_data_dir, "--config.train.num_devices=1")
    out, _ = second.communicate(timeout=RUN_LIMIT_S)
    assert second.returncode == 1, out
    assert f"is in use by another training run (pid {first.pid} on host" in out
    assert "Traceback" not in out
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=RUN_LIMIT_S)
    assert first.returncode == 0, out
    (saved,) = step_dirs(tmp_path / "checkpoints")
    assert f"checkpoint {saved} saved" in out  # said only once the save completed
    assert max(losses(tmp_path)) == saved


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from shufflenet_jax.train import workdir\n"
        "with workdir.locked(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir.WorkdirError, match=f"pid {holder.pid} on host"):
        with workdir.locked(tmp_path):
            pass
    holder.kill()  # SIGKILL: no cleanup runs
    holder.wait()
    with workdir.locked(tmp_path):
        assert str(os.getpid()) in (tmp_path / workdir.LOCK_NAME).read_text()


def test_an_empty_batch_is_refused_before_batchnorm_statistics_change():
    """Before: one training-mode call on an empty batch made every running statistic NaN."""
    model = ShuffleNetV2(0.5, 10, rngs=nnx.Rngs(0))
    model.train()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    with pytest.raises(ValueError, match=r"empty batch of shape \(0, 16, 16, 24\)"):
        model(jnp.zeros((0, 32, 32, 3)))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    chex.assert_trees_all_equal(before, after)


@pytest.mark.os_level
def test_a_non_finite_loss_at_an_eval_step_that_is_no_log_step_writes_no_model(
    digits_data_dir, tmp_path
):
    """Before: with eval_every=5 and log_every=10 the evaluation at step 5 saved best/5 with
    non-finite weights, and the error spoke of a last good checkpoint that did not exist."""
    config = small_config(
        digits_data_dir, base_learning_rate=1e30, eval_every=5, log_every=10, total_steps=20
    )
    with pytest.raises(FloatingPointError, match="no checkpoint had been written") as e:
        train_and_evaluate(config, tmp_path)
    assert int(str(e.value).split(" at step ")[1].split(";")[0]) <= 5
    assert not (tmp_path / "best").exists() or step_dirs(tmp_path / "best") == []
    assert step_dirs(tmp_path / "checkpoints") == []


def test_a_model_checkpoint_with_non_finite_values_is_refused_naming_the_leaf(tmp_path):
    model = ShuffleNetV2(0.5, 10, rngs=nnx.Rngs(0))
    model.conv5.layers[0].kernel[...] = (
        model.conv5.layers[0].kernel[...].at[0, 0, 0, 0].set(jnp.inf)
    )
    model_file.save_model(tmp_path / "m", model)
    with pytest.raises(ValueError, match=r"non-finite values at conv5\.layers\.0\.kernel"):
        model_file.restore_model(tmp_path / "m")


def _limit_file_size(limit: int):
    def apply():  # writes past `limit` bytes then fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.os_level
def test_a_failed_background_save_stops_training_at_once_and_keeps_the_last_good_one(
    digits_data_dir, tmp_path
):
    """A full disk, simulated by a file-size limit (writes past 256 kB fail, as on a full
    filesystem they fail with ENOSPC). Before: the failed save of step N went unnoticed until
    the next save, checkpoint_every steps later, and ended in thousands of traceback lines."""
    common = ("--config.train.checkpoint_every=2", "--config.train.num_devices=1")
    good = run_train(tmp_path, digits_data_dir, "--config.train.total_steps=2", *common)
    out, _ = good.communicate(timeout=RUN_LIMIT_S)
    assert good.returncode == 0, out
    env = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    full = run_train(
        tmp_path,
        digits_data_dir,
        "--config.train.total_steps=40",
        *common,
        env=env,
        preexec_fn=_limit_file_size(256 << 10),
    )
    out, _ = full.communicate(timeout=RUN_LIMIT_S)
    assert full.returncode == 1, out
    # one line naming the path and the OS error (orbax's writer threads add their own
    # reports around it, shortened by setup_process: docs/reliability.md)
    (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: saving in {tmp_path / 'checkpoints'} failed: "), line
    assert "File too large" in line
    assert max(losses(tmp_path)) <= 6  # the failed save of step 4 surfaced within two steps
    config = small_config(digits_data_dir)
    assert int(checkpoints.latest_weights(config, tmp_path)["step"]) == 2


@pytest.mark.os_level
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.bogus_field=1"], "the config has no field 'bogus_field'"),
        (["--config.train.log_every=0"], "config.train.log_every must be a positive"),
        (["--config.train.checkpoint_every=0"], "config.train.checkpoint_every must be"),
        (["--config.train.batch_size=-8"], "batch_size must be a positive number of images"),
        (["--config.data.data_dir=/nonexistent"], "not prepared"),
        (["--config.model.kernels=cuda"], "unknown kernel family 'cuda'; choose one of xla, cpp"),
    ],
)
def test_bad_settings_are_one_line_errors_and_leave_no_workdir(args, message, tmp_path):
    workdir_ = tmp_path / "new"
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits.py", f"--workdir={workdir_}"]
        + args,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and message in out.stderr, out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert not workdir_.exists()  # a failed start removes the workdir it created


@pytest.mark.os_level
@pytest.mark.parametrize("where", ["under_a_file", "under_proc"])
def test_an_unwritable_workdir_is_a_one_line_error_before_compiling(where, tmp_path):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "run"
    else:
        target = Path("/proc/self/shufflenet_run")
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits.py", f"--workdir={target}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot write to the workdir {target}:")
    ), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.os_level
def test_eval_py_says_which_checkpoint_step_it_evaluated(digits_data_dir, tmp_path):
    config = small_config(digits_data_dir, total_steps=3, checkpoint_every=3)
    train_and_evaluate(config, tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--config",
            "configs/digits.py",
            f"--config.data.data_dir={digits_data_dir}",
            "--config.train.num_devices=1",
            f"--workdir={tmp_path}",
            f"--json={tmp_path / 'e.json'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert f"weights: step 3 of {tmp_path / 'checkpoints'}" in out.stdout
    assert json.loads((tmp_path / "e.json").read_text())["model"]["examples"] == 359


@pytest.mark.os_level
def test_a_checkpoint_written_before_digests_were_recorded_still_resumes(
    digits_data_dir, tmp_path, caplog
):
    """Checkpoints from before the redesign have the same state layout and no digests."""
    config = small_config(digits_data_dir, total_steps=4, checkpoint_every=2)
    train_and_evaluate(config, tmp_path, stop_after=2)
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["digests"]
    meta_file.write_text(json.dumps(meta))
    caplog.set_level(logging.INFO)
    result = train_and_evaluate(config, tmp_path)
    assert not unusable_warnings(caplog)
    assert any("resumed from step 2" in r.getMessage() for r in caplog.records)
    assert int(result.state.step) == 4


def test_the_loss_check_runs_whenever_a_hook_it_guards_is_due():
    """A hook states its cadence once (`due`); the loss check has none of its own and checks
    the losses held since its last check as soon as any guarded hook would act."""
    from shufflenet_jax.train import hooks

    class EveryThird:
        def due(self, step, last):
            return step % 3 == 0 or last

    check = hooks.LossCheck([EveryThird()], Path("ckpt"), lambda: None)
    check(1, None, {"loss": jnp.float32(1.0)}, last=False)
    check(2, None, {"loss": jnp.float32(jnp.nan)}, last=False)  # held, not yet checked
    with pytest.raises(FloatingPointError, match="at step 2; no checkpoint had been written"):
        check(3, None, {"loss": jnp.float32(1.0)}, last=False)
    check = hooks.LossCheck([EveryThird()], Path("ckpt"), lambda: 6)
    check(7, None, {"loss": jnp.float32(jnp.inf)}, last=False)
    with pytest.raises(FloatingPointError, match="step 7; the last good checkpoint, step 6"):
        check(8, None, {"loss": jnp.float32(1.0)}, last=True)


_ONE_HOST_FAILS = """
import faulthandler, json, sys
from pathlib import Path
import jax
import orbax.checkpoint as ocp
from shufflenet_jax.process import setup_process
port, pid, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
stacks = open(directory.parent / f"stacks_{pid}.txt", "w")  # open until the process exits
faulthandler.dump_traceback_later(200, file=stacks)  # where it is, should the other wait for it
setup_process(f"localhost:{port}", 2, pid)
from configs import digits
from shufflenet_jax.train import checkpoints, parallel
from shufflenet_jax.train.state import create_model, create_train_state
config = digits.get_config()
replicated = parallel.replicated(parallel.make_mesh())
state = jax.device_put(create_train_state(config, create_model(config))[2], replicated)
manager = checkpoints.checkpoint_manager(directory, 3)
advance = jax.jit(lambda s: s.replace(step=s.step + 1))  # global arrays, as a step makes
for step in (1, 2):
    state = advance(state)
    meta = {**checkpoints.model_description(config), "digests": checkpoints.digests(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args)
    manager.wait_until_finished()
if pid == 1:  # this host alone reads step 2 back wrong (its bytes miss their digests)
    verify = checkpoints.verify
    def misread(tree, recorded):
        if int(tree.step.addressable_data(0)) == 2:
            raise checkpoints.CheckpointError("array .step does not match its recorded digest")
        return verify(tree, recorded)
    checkpoints.verify = misread
restored = checkpoints.restore_latest(manager, config, replicated)
step = int(restored.step.addressable_data(0))
print(json.dumps({"step": step, "steps": sorted(manager.all_steps())}))
"""


@pytest.mark.os_level
def test_processes_agree_to_set_aside_a_step_unusable_on_one_host_and_resume_together(tmp_path):
    """Before: only process 0 moved an unusable step aside and each process went on with its
    own finding, so a read failure on one host let the processes resume from different steps."""
    from .test_training import free_port

    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ONE_HOST_FAILS, str(port), str(i), str(tmp_path / "ckpt")],
            cwd=ROOT,
            env={**env, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    ended = [p.communicate(timeout=RUN_LIMIT_S) for p in procs]
    stacks = [(tmp_path / f"stacks_{i}.txt").read_text() for i in range(2)]
    tails = "\n".join(
        f"process {i}: {err[-3000:]}\nits stacks after 200 s: {stacks[i] or 'none'}"
        for i, (_, err) in enumerate(ended)
    )
    assert [p.returncode for p in procs] == [0, 0], tails
    results = [json.loads(out.splitlines()[-1]) for out, _ in ended]
    assert results == [{"step": 1, "steps": [1]}] * 2, results
    assert step_dirs(tmp_path / "ckpt" / "corrupt") == [2]
