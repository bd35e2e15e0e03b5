"""The real assets (the pretrained MNIST CNN and the MNIST data, shipped in installed packages) and
one end-to-end `shrink demo` run."""

import json
import os
import subprocess

import pytest
import torch

import shrinktunnel as st
from conftest import VENV_BIN, sqnr_db
from shrinktunnel import assets
from shrinktunnel.core.history import model_ref
from shrinktunnel.measure import accuracy, artifact_bytes, count_macs, float_safetensors_bytes


@pytest.fixture(scope="module")
def mnist():
    model = assets.mnist_cnn()
    test = assets.mnist_test()
    q = st.quantize(model, data=assets.mnist_calibration(), progress=False)
    return model, q, test


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches])


def test_mnist_cnn_loads_pretrained(mnist):
    model, _, _ = mnist
    assert sum(p.numel() for p in model.parameters()) == 390_410
    assert not model.training
    assert model_ref(model) == "shrinktunnel.assets:mnist_cnn"


def test_mnist_cnn_macs_by_formula(mnist):
    model, q, test = mnist
    expected = (32 * 28 * 28 * 1 * 9 + 64 * 14 * 14 * 32 * 9 + 128 * 7 * 7 * 64 * 9  # three 3x3 convs
                + 1152 * 256 + 256 * 10)  # two Linear layers
    x = test[0][0]
    assert count_macs(model, ((x,), {})) == expected == count_macs(q, ((x,), {}))


def test_mnist_data():
    test, calib = assets.mnist_test(), assets.mnist_calibration()
    assert sum(len(y) for _, y in test) == 10_000 and len(test) == 157
    assert test[0][0].shape == (64, 1, 28, 28) and test[0][1].dtype == torch.long
    ys = torch.cat([y for _, y in test])
    assert int(ys.min()) == 0 and int(ys.max()) == 9
    xs = torch.cat([x for x, _ in test])
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05  # normalised
    assert [len(y) for _, y in calib] == [64, 64, 64, 64]  # 256 training images
    first = assets.mnist_split("train", limit=256)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, first))


def test_fp32_accuracy_on_the_full_test_set(mnist):
    model, _, test = mnist
    assert accuracy(model, test) == 0.9906


def test_ptq_keeps_accuracy_within_0_2_points(mnist):
    model, q, test = mnist
    first_2000 = test[: 2000 // 64 + 1]  # 2,048 images
    assert accuracy(q, first_2000) >= accuracy(model, first_2000) - 0.002
    assert accuracy(q, test) >= 0.9906 - 0.002  # and on all 10,000
    # The logits themselves stay close: measured ~30 dB; 20 dB would already show a broken layer.
    assert sqnr_db(_logits(model, first_2000), _logits(q, first_2000)) > 20.0


def test_int8_artifact_is_at_most_27_percent_of_float(mnist, tmp_path):
    model, q, test = mnist
    path = st.save(q, tmp_path / "cnn-int8")
    ratio = artifact_bytes(path) / float_safetensors_bytes(model)
    assert ratio <= 0.27
    loaded = st.load(path)  # rebuilt from shrinktunnel.assets:mnist_cnn
    assert torch.equal(_logits(loaded, test[:4]), _logits(q, test[:4]))


def test_mnist_quantization_warns_about_nothing():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = st.compress(assets.mnist_cnn(), [st.QuantConfig()], data=assets.mnist_calibration(), progress=False)
    assert result.warnings == []
    assert [str(w.message) for w in caught if "quantize:" in str(w.message)] == []
    assert len([m for m in result.model.modules() if type(m).__name__ == "QuantizedLayer"]) == 5


def test_network_is_blocked_and_hub_offline():
    import socket

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with socket.socket() as s, pytest.raises(RuntimeError, match="must never download"):
        s.connect(("198.51.100.1", 443))  # TEST-NET-2: the guard in conftest refuses before any packet


def test_shrink_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([str(VENV_BIN / "shrink"), "demo", "--out", str(out)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("artifact/manifest.json", "artifact/model.safetensors", "int8.onnx", "fp32.onnx", "report.md", "report.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary leftovers
    report = json.loads((out / "report.json").read_text())
    fp32, int8 = report["variants"]["fp32"], report["variants"]["int8"]
    assert fp32["accuracy_torch"] == 0.9906
    assert abs(fp32["accuracy_onnx"] - fp32["accuracy_torch"]) <= 0.001
    assert int8["accuracy_torch"] >= fp32["accuracy_torch"] - 0.002  # drop of at most 0.2 points
    assert abs(int8["accuracy_onnx"] - int8["accuracy_torch"]) <= 0.001  # ORT and PyTorch within 0.1 point
    assert int8["bytes"] / fp32["bytes"] <= 0.27
    assert int8["bytes"] == artifact_bytes(out / "artifact")
    assert fp32["weights"] == int8["weights"] == 390_410
    for v in (fp32, int8):
        assert v["latency_torch"]["runs"] == 30 and v["latency_onnx"]["median_ms"] > 0
    assert report["warnings"] == []
    md = (out / "report.md").read_text()
    assert "accuracy, PyTorch" in md and "99.06 %" in md
    assert "99.06 %" in proc.stdout
    # The artifact the demo wrote reloads and scores what the report says.
    assert accuracy(st.load(out / "artifact"), assets.mnist_test()) == int8["accuracy_torch"]


def test_sampled_tweets_are_seeded_and_never_drawn_from_the_excluded_range():
    texts, _ = assets.tweets()
    a = assets.sampled_tweet_batches(40, exclude=range(40, len(texts)), seed=1, batch_size=16)
    b = assets.sampled_tweet_batches(40, exclude=range(40, len(texts)), seed=1, batch_size=16)
    assert [x["input_ids"].shape[0] for x in a] == [16, 16, 8]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    # Only the first 40 tweets are allowed: the sample is exactly them, shuffled.
    rows = {tuple(r.tolist()) for x in a for r in x["input_ids"]}
    prefix = {tuple(r.tolist()) for x in assets.tweet_batches(40, 0, batch_size=16) for r in x["input_ids"]}
    assert rows == prefix
    c = assets.sampled_tweet_batches(40, exclude=range(40, len(texts)), seed=2, batch_size=16)
    assert not torch.equal(c[0]["input_ids"], a[0]["input_ids"])


def test_minilm_with_eager_attention_is_the_same_function_and_reloads_as_itself():
    batch = assets.tweet_batches(8, 0, 8, 16)[0]
    sdpa, eager = assets.minilm(), assets.minilm_eager()
    assert model_ref(eager) == "shrinktunnel.assets:minilm_eager" and model_ref(sdpa) == "shrinktunnel.assets:minilm"
    assert eager.encoder.config._attn_implementation == "eager"
    with torch.no_grad():
        a, b = sdpa(**batch), eager(**batch)
    assert torch.allclose(a, b, atol=1e-5)  # the same math, summed in another order
