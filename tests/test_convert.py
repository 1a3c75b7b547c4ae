"""Cross-framework equivalence with torchvision (torch and torchvision required, never skipped)."""

import jax
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx

from shufflenet_jax.interop.compare import (
    jax_stages,
    random_torchvision_model,
    torch_stages,
)
from shufflenet_jax.interop.convert import (
    WeightMismatchError,
    grads_to_torch,
    load_torchvision,
    to_torch_state_dict,
    torch_to_values,
)
from shufflenet_jax.model.network import STAGE_NAMES, abstract_model, with_values

from .helpers import FLOAT64_STEP_REL

pytestmark = pytest.mark.torch

WIDTHS = (0.5, 1.0, 1.5, 2.0)
# BatchNorm biases followed by a 1x1 conv and another BatchNorm: zero gradient in train mode.
ZERO_GRADIENT_SUFFIXES = ("branch1.1.bias", "branch2.4.bias")


def assert_close_to_torch(ours, ref, rel):
    """max |ours - ref| <= rel * max(1, max |ref|), for every output named in `ref`."""
    for name, r in ref.items():
        bound = rel * max(1.0, float(np.max(np.abs(r))))
        err = float(np.max(np.abs(np.asarray(ours[name]) - r)))
        assert err <= bound, f"{name}: max |diff| {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def torch_x0_5():
    return random_torchvision_model(0.5, num_classes=10, seed=1).eval()


@pytest.mark.parametrize("width", WIDTHS)
def test_eval_logits_and_every_stage_match_torchvision(width):
    torch_model = random_torchvision_model(width, seed=0).eval()
    model = load_torchvision(torch_model, width)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ref = torch_stages(torch_model, x)
    assert set(ref) == {*STAGE_NAMES, "fc"}
    # The check is only meaningful if the statistics are not the identity defaults.
    assert not torch.allclose(
        torch_model.conv5[1].running_var, torch.ones(1024 if width < 2 else 2048)
    )
    assert_close_to_torch(jax_stages(model, x), ref, rel=1e-4)


def test_converted_weights_match_on_a_non_square_input(torch_x0_5):
    model = load_torchvision(torch_x0_5)
    model.eval()
    x = np.random.default_rng(1).standard_normal((1, 193, 257, 3)).astype(np.float32)
    assert_close_to_torch(jax_stages(model, x), torch_stages(torch_x0_5, x), rel=1e-4)


def torch_train_step(model, x_nhwc, labels, lr):
    """One SGD step in PyTorch; returns logits, gradients (before the step) and the new state."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    opt.step()
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return logits.detach().numpy(), grads, state


def jax_train_step(model, x, labels, lr):
    """The same step in JAX; returns logits, gradients in torch naming/layout, and the new state."""
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, logits

        (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return logits, grads

    logits, grads = step(model, optimizer, x, labels)
    torch_grads = grads_to_torch(model, grads)
    state = {k: v.numpy() for k, v in to_torch_state_dict(model).items()}
    return np.asarray(logits), torch_grads, state


def train_batch(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 64, 64, 3)).astype(dtype)
    return x, rng.integers(0, 10, size=8)


def test_train_mode_outputs_use_batch_statistics_like_torch(torch_x0_5):
    torch_model = random_torchvision_model(0.5, num_classes=10, seed=1)
    model = load_torchvision(torch_model)
    x, labels = train_batch(np.float32)
    ref_logits, _, _ = torch_train_step(torch_model, x, labels, lr=0.1)
    logits, _, _ = jax_train_step(model, x, labels.astype(np.int32), lr=0.1)
    assert_close_to_torch({"fc": logits}, {"fc": ref_logits}, rel=1e-4)


@pytest.fixture(scope="module")
def float64_train_step():
    """Both frameworks take one SGD step from the same weights on the same batch, in float64.

    Train-mode gradients of a randomly initialised ShuffleNet are ill-conditioned in float32:
    `python benchmarks/float32_conditioning.py --size 128 --batch 4` shows PyTorch float32 18%
    and JAX float32 2.4% away from PyTorch float64 on some tensors. In float64 rounding is
    ~1e-16, so any real difference between the frameworks shows.
    """
    torch_model = random_torchvision_model(0.5, num_classes=10, seed=1).double()
    before = {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}
    x, labels = train_batch(np.float64)
    ref = torch_train_step(torch_model, x, labels, lr=0.1)
    with jax.enable_x64(True):
        abstract = abstract_model(0.5, 10, unbiased_running_var=True)
        sd = {k: v for k, v in before.items() if not k.endswith("num_batches_tracked")}
        model = with_values(abstract, torch_to_values(sd, abstract))
        assert model.conv1.layers[0].kernel[...].dtype == np.float64
        ours = jax_train_step(model, x, labels, lr=0.1)
    return before, ref, ours


def test_gradients_of_every_parameter_match_torch(float64_train_step):
    _, (_, ref_grads, _), (_, grads, _) = float64_train_step
    assert len(ref_grads) == 170 and set(grads) == set(ref_grads)
    # The bias of a BatchNorm followed by a 1x1 conv and a train-mode BatchNorm (branch1.1,
    # branch2.4) cannot change the output: its gradient is zero in exact arithmetic, so both
    # frameworks must give float64 rounding noise there rather than a relative match.
    zero = {k for k in ref_grads if k.endswith(ZERO_GRADIENT_SUFFIXES)}
    assert len(zero) == 3 + 16
    for key, g in ref_grads.items():
        err = np.max(np.abs(grads[key] - g))
        if key in zero:
            assert max(np.max(np.abs(g)), np.max(np.abs(grads[key]))) < 1e-12, key
        else:
            bound = FLOAT64_STEP_REL * np.max(np.abs(g))
            assert err <= bound, f"{key}: {err:.3e} vs {np.max(np.abs(g)):.3e}"


def test_one_sgd_step_gives_the_same_parameters_and_running_statistics(float64_train_step):
    before, (_, _, ref_state), (_, _, state) = float64_train_step
    moved = set()
    for key, ref in ref_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        err = np.max(np.abs(state[key] - ref))
        assert err <= FLOAT64_STEP_REL * np.max(np.abs(ref)), f"{key}: {err:.3e}"
        if not np.array_equal(ref, before[key]):
            moved.add(key)
    # The step changed every parameter and statistic, except zero-gradient biases.
    should_move = {
        k for k in ref_state if not k.endswith(("num_batches_tracked", *ZERO_GRADIENT_SUFFIXES))
    }
    assert len(should_move) == 338 - 56 - 19 and should_move <= moved


def test_eval_mode_float32_gradients_match_torch(torch_x0_5):
    """With frozen BatchNorm (fine-tuning) the float32 gradients are well-conditioned."""
    x, labels = train_batch(np.float32)
    torch_x0_5.eval()
    torch_x0_5.zero_grad()
    logits = torch_x0_5(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    model = load_torchvision(torch_x0_5)
    model.eval()

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    grads = grads_to_torch(model, nnx.jit(nnx.grad(loss_fn))(model))
    for key, p in torch_x0_5.named_parameters():
        g = p.grad.numpy()
        err = np.max(np.abs(grads[key] - g))
        assert err <= 1e-3 * np.max(np.abs(g)), f"{key}: {err:.3e}"


def test_default_batchnorm_keeps_flax_biased_running_variance(torch_x0_5):
    """The default (Flax) running variance differs from PyTorch's unbiased one by n/(n-1)."""
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
    biased, unbiased = (
        load_torchvision(torch_x0_5),
        load_torchvision(torch_x0_5, unbiased_running_var=True),
    )
    for m in (biased, unbiased):
        m.train()
        nnx.jit(lambda m, x: m(x))(m, x)
    n = 2 * 4 * 4  # values per channel after conv1 (8x8 -> 4x4) in a batch of 2
    v0 = torch_x0_5.conv1[1].running_var.numpy()
    vb, vu = biased.conv1.layers[1].var[...], unbiased.conv1.layers[1].var[...]
    np.testing.assert_allclose((vu - 0.9 * v0), (vb - 0.9 * v0) * n / (n - 1), rtol=1e-5)


def test_round_trip_reproduces_the_torchvision_state_dict_exactly(torch_x0_5):
    original = torch_x0_5.state_dict()
    back = to_torch_state_dict(load_torchvision(torch_x0_5))
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    fresh = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    fresh.load_state_dict(back, strict=True)


def test_dataparallel_prefix_checkpoint_dict_and_files_are_accepted(torch_x0_5, tmp_path):
    sd = torch_x0_5.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    reference = nnx.to_pure_dict(nnx.state(load_torchvision(sd)))
    for source in (torch_x0_5, wrapped, str(tmp_path / "w.pth")):
        got = nnx.to_pure_dict(nnx.state(load_torchvision(source, 0.5, 10)))
        for (p, a), (_, b) in zip(sorted_flat(got), sorted_flat(reference), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=str(p))


def sorted_flat(tree, prefix=()):
    out = []
    for k in sorted(tree, key=str):
        v = tree[k]
        out += sorted_flat(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]
    return out


class _WritesAFile:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.0.weight": _WritesAFile(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .*evil.pth: it is not a plain weights"):
        load_torchvision(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_missing_key_is_named(torch_x0_5):
    sd = dict(torch_x0_5.state_dict())
    del sd["stage3.2.branch2.3.weight"]
    with pytest.raises(
        WeightMismatchError, match=r"missing keys \(1\): stage3\.2\.branch2\.3\.weight"
    ):
        load_torchvision(sd)


def test_an_unexpected_key_is_named(torch_x0_5):
    sd = {**torch_x0_5.state_dict(), "head.weight": torch.zeros(3, 3)}
    with pytest.raises(WeightMismatchError, match=r"unexpected keys \(1\): head\.weight"):
        load_torchvision(sd)


def test_a_checkpoint_of_another_width_is_refused_with_the_keys_named(torch_x0_5):
    with pytest.raises(
        WeightMismatchError,
        match=r"stage2\.0\.branch1\.2\.weight.* holds a 0\.5x model .* but 1\.0x",
    ):
        load_torchvision(torch_x0_5, width=1.0)
    sd = {k: v.numpy() for k, v in torch_x0_5.state_dict().items() if "num_batches" not in k}
    with pytest.raises(
        WeightMismatchError,
        match=r"wrongly-shaped keys .*stage2\.0\.branch1\.2\.weight: "
        r"got \(24, 24, 1, 1\), model needs \(58, 24, 1, 1\)",
    ):
        torch_to_values(sd, abstract_model(1.0, 10))


def test_a_different_class_count_is_refused(torch_x0_5):
    with pytest.raises(WeightMismatchError, match="10 classes, but 0.5x with 1000 classes"):
        load_torchvision(torch_x0_5, num_classes=1000)


def test_unreadable_weight_files_are_one_line_errors_naming_the_file(torch_x0_5, tmp_path):
    good = tmp_path / "good.pth"
    torch.save(torch_x0_5.state_dict(), good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    for name, reason in [
        ("truncated.pth", "cannot read .*truncated.pth as a torch weights file"),
        ("empty.pth", "cannot read .*empty.pth as a torch weights file"),
        ("folder.pth", "folder.pth is not a file"),
    ]:
        with pytest.raises(ValueError, match=reason) as e:
            load_torchvision(tmp_path / name)
        assert "\n" not in str(e.value)


def test_a_value_that_is_not_a_tensor_is_named_by_its_key(torch_x0_5):
    sd = dict(torch_x0_5.state_dict())
    sd["conv5.1.running_mean"] = "not numbers"
    with pytest.raises(WeightMismatchError, match=r"'conv5\.1\.running_mean' holds a str"):
        load_torchvision(sd)


def test_weights_with_non_finite_values_are_refused_naming_the_leaf(torch_x0_5):
    sd = {k: v.clone() for k, v in torch_x0_5.state_dict().items()}
    sd["stage3.1.branch2.5.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values at stage3\.layers\.1\.branch2"):
        load_torchvision(sd)
