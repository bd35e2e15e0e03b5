"""MODEL / DATA references: 'pkg.module:factory', 'path/to/file.py:factory', .npz / .safetensors."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from torch import nn

from conftest import FACTORIES
from shrinktunnel.core.history import model_ref
from shrinktunnel.core.refs import load_data, load_model, resolve_callable
from shrinktunnel.errors import DataError, ModelError


def test_package_reference():
    from shrinktunnel import assets

    assert resolve_callable("shrinktunnel.assets:mnist_cnn") is assets.mnist_cnn


def test_file_reference_loads_a_module_level_factory():
    model = load_model(f"{FACTORIES}:mlp")
    assert type(model).__name__ == "SmallMLP"
    assert not model.training  # load_model puts the model in eval mode
    assert model_ref(model) == f"{FACTORIES}:mlp"  # and records where it came from


def test_file_reference_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(FACTORIES.parent)
    assert type(load_model("factories.py:residual")).__name__ == "Residual"


def test_factories_are_called_afresh():
    a, b = load_model(f"{FACTORIES}:mlp"), load_model(f"{FACTORIES}:mlp")
    assert a is not b
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("ref", ["no_colon_here", "module:", ":factory"])
def test_reference_without_factory_name(ref):
    with pytest.raises(ModelError) as info:
        resolve_callable(ref)
    assert "package.module:factory" in str(info.value)


def test_data_references_raise_data_errors():
    with pytest.raises(DataError):
        resolve_callable("no_colon_here", "data")


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(f"{tmp_path}/missing.py:make")
    assert "missing.py" in str(info.value) and "does not exist" in str(info.value)


def test_unimportable_module():
    with pytest.raises(ModelError) as info:
        load_model("no_such_package_xyz.models:make")
    assert "cannot import module 'no_such_package_xyz.models'" in str(info.value)


def test_missing_attribute_lists_the_callables():
    with pytest.raises(ModelError) as info:
        load_model(f"{FACTORIES}:no_such_factory")
    msg = str(info.value)
    assert "no callable 'no_such_factory'" in msg and "mlp" in msg and "residual" in msg


def test_attribute_that_is_not_callable():
    with pytest.raises(ModelError, match="no callable 'NOT_CALLABLE'"):
        load_model(f"{FACTORIES}:NOT_CALLABLE")


def test_file_that_fails_to_import(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import this_module_does_not_exist_xyz\n")
    with pytest.raises(ModelError) as info:
        load_model(f"{f}:make")
    assert "importing model file" in str(info.value) and "ModuleNotFoundError" in str(info.value)


def test_factory_that_raises():
    with pytest.raises(ModelError) as info:
        load_model(f"{FACTORIES}:raising_factory")
    assert "the factory failed" in str(info.value) and "RuntimeError" in str(info.value)


def test_factory_that_returns_no_module():
    with pytest.raises(ModelError, match="returned dict, not a torch.nn.Module"):
        load_model(f"{FACTORIES}:not_a_module")


def test_data_factory():
    batches = load_data(f"{FACTORIES}:calibration_batches")
    assert len(batches) == 3 and batches[0].shape == (8, 6)


def test_data_factory_that_raises():
    with pytest.raises(DataError, match="the factory failed"):
        load_data(f"{FACTORIES}:raising_factory")


def _write(path, **arrays):
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_numpy(arrays, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_array_file_with_labels_is_cut_into_batches(tmp_path, suffix):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int64)
    batches = load_data(_write(tmp_path / f"d{suffix}", x=x, y=y), batch_size=4)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.from_numpy(x))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.from_numpy(y))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_array_file_without_labels_gives_tensor_batches(tmp_path, suffix):
    x = np.ones((5, 2), dtype=np.float32)
    batches = load_data(_write(tmp_path / f"d{suffix}", x=x), batch_size=2)
    assert all(isinstance(b, torch.Tensor) for b in batches) and [len(b) for b in batches] == [2, 2, 1]


def test_empty_npz_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="empty 'x'"):
        load_data(_write(tmp_path / "e.npz", x=np.zeros((0, 3), np.float32)))


def test_npz_without_x_lists_what_it_holds(tmp_path):
    with pytest.raises(DataError) as info:
        load_data(_write(tmp_path / "n.npz", a=np.zeros((3, 3), np.float32)))
    assert "['a']" in str(info.value) and "'x'" in str(info.value)


def test_label_count_mismatch(tmp_path):
    with pytest.raises(DataError, match="'x' has 4 samples but 'y' has 3"):
        load_data(_write(tmp_path / "m.npz", x=np.zeros((4, 2), np.float32), y=np.zeros(3)))


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))


def test_corrupt_data_file(tmp_path):
    f = tmp_path / "corrupt.npz"
    f.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="cannot read data file"):
        load_data(str(f))


def test_npz_is_never_unpickled(tmp_path):
    f = tmp_path / "objects.npz"
    np.savez(f, x=np.array([{"a": 1}, {"b": 2}], dtype=object))  # object arrays are stored as pickle
    with pytest.raises(DataError, match="cannot read data file"):
        load_data(str(f))


def test_loaded_model_is_usable():
    model = load_model(f"{FACTORIES}:mlp")
    assert isinstance(model, nn.Module) and model(torch.randn(2, 6)).shape == (2, 3)



def test_a_factory_that_exits_is_an_error_not_a_silent_exit():
    with pytest.raises(ModelError, match="called exit"):
        load_model("sys:exit")


def test_file_module_name_is_the_content_digest_in_every_process(tmp_path):
    """The same file gives the same module name in processes with different string-hash salts (the
    analysis cache keys on it)."""
    import hashlib
    import os
    import subprocess
    import sys

    f = tmp_path / "m.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    code = f"from shrinktunnel.core.refs import resolve_callable; print(resolve_callable({str(f) + ':make'!r}).__module__)"
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert names == {f"_shrinktunnel_user_{hashlib.sha256(f.read_bytes()).hexdigest()[:32]}"}
