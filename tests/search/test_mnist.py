"""st.analyze on the real MNIST CNN (fast settings: 256 test images, two actions)."""

from __future__ import annotations

from shrinktunnel import assets
from shrinktunnel.measure import accuracy
from shrinktunnel.search import analyze


def test_analyze_mnist_cnn():
    data = assets.mnist_split("test", limit=256, batch_size=256)
    a = analyze(assets.mnist_cnn(), data, eval_fn=lambda m: accuracy(m, data), actions=["quant8", "quant2"],
                progress=False, latency_runs=2)
    names = ["conv_layers.0", "conv_layers.3", "conv_layers.6", "fc_layers.0", "fc_layers.2"]
    assert [lp.name for lp in a.layers] == names
    by = {lp.name: lp for lp in a.layers}
    assert sum(lp.params for lp in a.layers) == a.totals["params"] == 390_410
    # MACs per sample: out channels x in channels x 3 x 3 x output pixels; Linear: in x out.
    assert by["conv_layers.0"].macs == 32 * 1 * 9 * 28 * 28
    assert by["conv_layers.3"].macs == 64 * 32 * 9 * 14 * 14
    assert by["conv_layers.6"].macs == 128 * 64 * 9 * 7 * 7
    assert by["fc_layers.0"].macs == 1152 * 256 and by["fc_layers.2"].macs == 256 * 10
    assert a.baseline > 0.98
    assert all(a.drop(n, "quant8") <= 2 / 256 for n in names)  # 8-bit weights: at most 2 of 256 images change
    assert a.drop("fc_layers.2", "quant2") > 0.02  # the classifier at 2 bits loses several points
    fc0 = a.results["fc_layers.0"]
    assert fc0["quant8"]["bytes_after"] < 0.27 * by["fc_layers.0"].bytes
    assert fc0["quant2"]["bytes_after"] < 0.5 * fc0["quant8"]["bytes_after"]
