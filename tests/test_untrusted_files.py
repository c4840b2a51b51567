"""Files a user downloads or is handed never run code: CIFAR pickles and model checkpoints.

A crafted file whose pickle carries a `__reduce__` payload must fail in one line naming the file,
and the payload must not have run (its marker file stays absent); genuine files still load.
"""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_formats import write_cifar10

from mu_runner.data.formats import load_cifar
from mu_runner.errors import DatasetError


class _OpenMarker:
    """Unpickling calls open(marker, "w") (pickled as io.open): the file appears if the payload runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class _ShellMarker:
    """Unpickling calls os.system("touch marker") (pickled as posix.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write(path: Path, obj: object, protocol: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


# --------------------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("payload, refused", [(_OpenMarker, "io.open"), (_ShellMarker, "posix.system")])
def test_a_crafted_cifar_batch_is_refused_and_its_payload_never_runs(tmp_path, payload, refused):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _write(batch, {b"labels": [1], b"data": payload(marker)})
    with pytest.raises(DatasetError) as err:
        load_cifar(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(batch) in msg and f"refuses to unpickle {refused}" in msg and "data.trust_files=true" in msg
    assert not marker.exists()


def test_a_crafted_meta_file_is_refused_too(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _write(tmp_path / "cifar-10-batches-py" / "batches.meta", {b"label_names": _OpenMarker(marker)})
    with pytest.raises(DatasetError, match=r"batches\.meta: refuses to unpickle io\.open"):
        load_cifar(tmp_path)
    assert not marker.exists()


def test_trust_files_is_the_explicit_way_out(tmp_path):
    """data.trust_files=true unpickles unrestricted: the payload runs (which is why it is opt-in)."""
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    names = [b"c%d" % i for i in range(10)]
    _write(meta, {b"label_names": names, b"x": _OpenMarker(marker)})
    assert load_cifar(tmp_path, trust_files=True).classes == [n.decode() for n in names]
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_genuine_batches_with_numpy_arrays_load_under_every_protocol(tmp_path, protocol):
    """numpy arrays pickled with protocol 2 (_codecs.encode, _reconstruct), 4 and 5 (_frombuffer)."""
    _, train_lbls, test_imgs, test_lbls = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(protocol)
    imgs = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    labels = np.array([3, 7], dtype=np.int64)
    _write(folder / "data_batch_1", {b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": imgs,
                                     b"filenames": [b"a.png", b"b.png"]}, protocol)
    src_meta = [b"n%d" % i for i in range(10)]
    _write(folder / "batches.meta", {b"label_names": src_meta, b"num_vis": 3072, b"f": 0.5}, protocol)
    _write(folder / "test_batch", {b"labels": [int(v) for v in test_lbls], b"data": test_imgs.reshape(3, 3072)},
           protocol)
    src = load_cifar(tmp_path)
    assert torch.equal(src.train.images[:2], torch.from_numpy(imgs.reshape(2, 3, 32, 32)))
    assert src.train.labels[:2].tolist() == [3, 7]
    assert src.train.labels[2:].tolist() == train_lbls[2:]
    assert torch.equal(src.test.images, torch.from_numpy(test_imgs))
    assert src.classes == [n.decode() for n in src_meta]


def test_data_trust_files_reaches_the_loader_and_not_the_cache_key(tiny, tmp_path):
    from mu_runner.run import _recipe_spec, make

    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _write(tmp_path / "cifar-10-batches-py" / "test_batch", {b"labels": [1], b"data": _OpenMarker(marker)})
    cfg = tiny("data=cifar10", f"paths.data_dir={tmp_path}")
    assert cfg.data.trust_files is False
    with pytest.raises(DatasetError, match=r"refuses to unpickle io\.open"):
        make(cfg.data.source, "data")  # as the run loads it: the DatasetError itself
    assert not marker.exists()
    trusting = tiny("data=cifar10", f"paths.data_dir={tmp_path}", "data.trust_files=true")
    assert trusting.data.source.trust_files is True
    assert _recipe_spec(trusting) == _recipe_spec(cfg)  # how files are read does not retrain the original


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_error(path: Path) -> str:
    from mu_runner.checkpoints import read_checkpoint
    from mu_runner.errors import CheckpointError

    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"original_checkpoint={str(path)!r}: not a safetensors / weights-only checkpoint (")
    return msg


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("these are not the weights you are looking for\n")
    assert "starts with b'these ar'" in _checkpoint_error(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "the file is empty" in _checkpoint_error(tmp_path / "empty.pt")


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    whole = tmp_path / "whole.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "SafetensorError" in _checkpoint_error(cut)
    renamed = tmp_path / "cut.pt"  # a safetensors file is recognised whatever its name
    renamed.write_bytes(cut.read_bytes())
    assert "SafetensorError" in _checkpoint_error(renamed)


@pytest.mark.parametrize("payload, refused", [(_OpenMarker, "io.open"), (_ShellMarker, "posix.system")])
def test_a_pickle_of_arbitrary_objects_is_refused_and_its_payload_never_runs(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": payload(marker)}, path)
    assert f"it pickles {refused}" in _checkpoint_error(path)
    assert not marker.exists()


def test_a_dict_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "a.pt")
    assert "'epoch' is a int, not a tensor" in _checkpoint_error(tmp_path / "a.pt")
    torch.save({}, tmp_path / "b.pt")
    assert "it holds no tensors" in _checkpoint_error(tmp_path / "b.pt")
    torch.save([torch.ones(1)], tmp_path / "c.pt")
    assert "it holds a list, not a dict of tensors" in _checkpoint_error(tmp_path / "c.pt")


def test_valid_checkpoints_load_into_the_backbone(tiny, tmp_path):
    from conftest import same_state
    from safetensors.torch import save_file

    from mu_runner.checkpoints import read_checkpoint
    from mu_runner.run import load_data, load_weights, new_net

    cfg = tiny("seed=3")
    data = load_data(cfg)
    net = new_net(cfg, data)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "net.safetensors"))
    torch.save(state, tmp_path / "net.pt")
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "net.ckpt")  # a checkpoint with its state_dict
    other = tiny("seed=4")
    for name in ("net.safetensors", "net.pt", "net.ckpt"):
        fresh = new_net(other, data)
        assert not same_state(fresh, net)
        assert same_state(load_weights(fresh, read_checkpoint(str(tmp_path / name)), name), net)


def test_a_run_with_a_crafted_checkpoint_stops_before_training(tiny, tmp_path):
    from mu_runner.errors import CheckpointError
    from mu_runner.run import build

    marker = tmp_path / "pwned"
    torch.save({"w": _OpenMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a safetensors / weights-only checkpoint"):
        build(tiny(f"original_checkpoint={tmp_path}/evil.pt"))
    assert not marker.exists() and not (tmp_path / "cache").exists()
