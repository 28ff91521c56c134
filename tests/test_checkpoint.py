"""The network's saved form, and checkpoints: round trip, safetensors only, verified, other architectures refused."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import checkpoint_state, metrics_record
from distmnist.catalogue import checkpoint_name, newest_valid, scan
from distmnist.checkpoint import load_checkpoint, load_weights, save_weights, unflatten_optimizer, write_checkpoint
from distmnist.errors import DistmnistError
from distmnist.model import Net, parameter_count, to_input
from distmnist.rundir import prune

KEYS = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ---------------------------------------------------------------- the model


def test_net_is_the_tutorials_network():
    net = Net()
    assert parameter_count(net) == 38_390
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == KEYS  # exactly these keys, no buffers, no prefixes
    assert shapes == {
        "conv1.weight": (10, 1, 5, 5), "conv1.bias": (10,), "conv2.weight": (20, 10, 5, 5), "conv2.bias": (20,),
        "fc1.weight": (100, 320), "fc1.bias": (100,), "fc2.weight": (10, 100), "fc2.bias": (10,),
    }
    assert net.drop2D.p == 0.25 and isinstance(net.drop2D, torch.nn.Dropout2d)


def test_net_outputs_log_probabilities():
    torch.manual_seed(0)
    net = Net().eval()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    out = net(to_input(images))
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert (out <= 0).all()
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))
    torch.testing.assert_close(out, F.log_softmax(out, dim=1))  # already normalised


def test_to_input_scales_like_to_tensor():
    from torchvision.transforms.functional import to_tensor

    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    x = to_input(images)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    expected = torch.stack([to_tensor(img.numpy()) for img in images])
    assert torch.equal(x, expected)


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    net = Net()
    x = to_input(torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8))
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


# ---------------------------------------------------------------- checkpoints


def trained_state(seed: int = 0):
    """A model and an SGD optimizer after two real steps, so momentum buffers exist."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        x = to_input(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8))
        F.nll_loss(model(x), torch.tensor([1, 2, 3, 4])).backward()
        opt.step()
    rng = {"cpu": torch.stack([torch.get_rng_state(), torch.get_rng_state()])}
    return model, opt, rng


def write(tmp_path, epoch=3, model_state=None, seed=0):
    model, opt, rng = trained_state(seed)
    weights = model.state_dict() if model_state is None else model_state
    path = write_checkpoint(tmp_path / "run" / "checkpoints" / checkpoint_name(epoch), weights, opt.state_dict(), rng,
                            checkpoint_state(epoch=epoch))
    return path, model, opt, rng


def test_round_trip_restores_every_tensor_and_the_state(tmp_path):
    path, model, opt, rng = write(tmp_path)
    assert path == tmp_path / "run" / "checkpoints" / "epoch-0003"
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 3 and ckpt.state.step == 42 and ckpt.state.data.world_size == 2
    assert ckpt.state.progress.metrics == [metrics_record(e) for e in (1, 2, 3)] and ckpt.state.config == {"lr": 0.01}
    assert ckpt.run_id == "run-a" and ckpt.state.mid_epoch is None and ckpt.epochs_done == 3
    assert ckpt.state == replace(checkpoint_state(epoch=3), optimizer_param_groups=ckpt.state.optimizer_param_groups)
    assert list(ckpt.model) and set(ckpt.model) == set(KEYS)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model[key], value)
    assert torch.equal(ckpt.rng["cpu"], rng["cpu"]) and ckpt.rng["cpu"].dtype == torch.uint8

    # the optimizer state comes back into a fresh SGD and matches, momentum buffers included
    fresh = Net()
    fresh.load_state_dict(ckpt.model, strict=True)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.1)
    fresh_opt.load_state_dict(unflatten_optimizer(ckpt.optimizer, ckpt.state.optimizer_param_groups))
    original, restored = opt.state_dict(), fresh_opt.state_dict()
    assert len(restored["state"]) == len(KEYS)
    for index, entries in original["state"].items():
        assert torch.equal(restored["state"][index]["momentum_buffer"], entries["momentum_buffer"])
    assert restored["param_groups"][0]["lr"] == 0.01 and restored["param_groups"][0]["momentum"] == 0.9


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    path, *_ = write(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    ]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-0003"]  # no temp folder left
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


def test_checkpoint_weights_load_into_a_plain_net(tmp_path):
    path, model, *_ = write(tmp_path)
    plain = Net()
    plain.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    x = to_input(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8))
    assert torch.equal(plain.eval()(x), model.eval()(x))


def test_save_weights_loads_into_a_plain_net(tmp_path):
    model, _, _ = trained_state(seed=5)
    target = tmp_path / "model.safetensors"
    save_weights(model.state_dict(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    weights = load_file(str(target))
    assert set(weights) == set(KEYS)
    plain = Net()
    plain.load_state_dict(weights, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    assert set(load_weights(target)) == set(KEYS)


def other_architecture(kind: str) -> dict[str, torch.Tensor]:
    weights = {k: v.clone() for k, v in Net().state_dict().items()}
    if kind == "shape":
        weights["fc1.weight"], weights["fc1.bias"] = torch.zeros(50, 320), torch.zeros(50)
    elif kind == "extra":
        weights["fc3.weight"] = torch.zeros(10, 10)
    elif kind == "missing":
        del weights["fc2.bias"]
    elif kind == "dtype":
        weights["conv1.weight"] = weights["conv1.weight"].double()
    elif kind == "prefix":  # what a torch.compile'd model's state dict looks like
        weights = {f"_orig_mod.{k}": v for k, v in weights.items()}
    return weights


@pytest.mark.parametrize(
    "kind, message",
    [
        ("shape", "tensor fc1.weight is torch.float32 (50, 320), expected torch.float32 (100, 320)"),
        ("extra", "unexpected fc3.weight"),
        ("missing", "missing fc2.bias"),
        ("dtype", "tensor conv1.weight is torch.float64"),
        ("prefix", "missing conv1.bias"),
    ],
)
def test_checkpoint_of_another_architecture_is_refused_naming_the_file(tmp_path, kind, message):
    weights = other_architecture(kind)
    path, *_ = write(tmp_path, model_state=weights)
    with pytest.raises(DistmnistError) as err:
        load_checkpoint(path)
    assert str(path / "model.safetensors") in str(err.value) and message in str(err.value)

    loose = tmp_path / "other.safetensors"
    save_file(weights, str(loose))
    with pytest.raises(DistmnistError) as err:
        load_weights(loose)
    assert str(loose) in str(err.value) and message in str(err.value)


def test_tampered_checkpoint_is_refused_naming_the_file(tmp_path):
    path, *_ = write(tmp_path)
    target = path / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed in the data
    target.write_bytes(bytes(data))
    with pytest.raises(DistmnistError, match="SHA-256 does not match") as err:
        load_checkpoint(path)
    assert str(target) in str(err.value)

    target.write_bytes(bytes(data[:-4]))
    with pytest.raises(DistmnistError, match="4 bytes|manifest says") as err:
        load_checkpoint(path)
    assert str(target) in str(err.value)


def test_pickles_and_unlisted_files_are_refused(tmp_path):
    path, *_ = write(tmp_path)
    (path / "extra.pt").write_bytes(b"\x80\x04N.")  # a pickle of None
    with pytest.raises(DistmnistError, match="pickle file in a checkpoint") as err:
        load_checkpoint(path)
    assert "extra.pt" in str(err.value)
    (path / "extra.pt").unlink()
    (path / "notes.txt").write_text("hi")
    with pytest.raises(DistmnistError, match="not listed in"):
        load_checkpoint(path)


def test_missing_checkpoint_and_garbage_weights_are_clear_errors(tmp_path):
    with pytest.raises(DistmnistError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(DistmnistError, match="--checkpoint: no such file or folder"):
        load_weights(tmp_path / "nope.safetensors")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(DistmnistError, match="not a valid safetensors file") as err:
        load_weights(garbage)
    assert str(garbage) in str(err.value)


def test_newest_valid_skips_broken_checkpoints_and_prune_keeps_the_newest(tmp_path):
    for epoch in (1, 2, 3):
        write(tmp_path, epoch=epoch, seed=epoch)
    run = tmp_path / "run"
    assert [e.path.name for e in scan(run)] == ["epoch-0003", "epoch-0002", "epoch-0001"]
    (run / "checkpoints" / "epoch-0003" / "manifest.json").unlink()  # as if a save was interrupted
    warnings = []
    ckpt = newest_valid(run, "run-a", warnings.append)
    assert ckpt is not None and ckpt.epoch == 2
    assert len(warnings) == 1 and "epoch-0003" in warnings[0]
    newest = run / "checkpoints" / "epoch-0003"
    assert [p.name for p in prune(run, "run-a", keep=1, just_written=newest)] == ["epoch-0002", "epoch-0001"]
    assert [e.path.name for e in scan(run)] == ["epoch-0003"]
    assert prune(run, "run-a", keep=0, just_written=newest) == []
