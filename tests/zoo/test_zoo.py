"""The fast subset of the model-zoo conformance matrix (the whole one: benchmarks/coverage.py ->
docs/coverage.md): every zoo model builds offline and runs; a few real architectures x methods hold the
matrix's bar: at least 95 % of the eligible weights transformed, every layer left alone with a reason,
the library's coverage record agreeing with an independent count, `st.save` -> `st.load` bit-identical,
and ONNX Runtime matching PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.conformance import SHARE_TARGET, TOLERANCE, _reason_for, eligible_weights, own_coverage, run_cell
from zoo.models import ZOO, Conv2dSame, Conv2dStaticSamePadding, SamePadCNN, build, example_inputs, run

pytestmark = pytest.mark.filterwarnings("ignore")


# timm's models (millions of weights each) are built by benchmarks/coverage.py only: the default suite stays fast.
@pytest.mark.parametrize("name", [n for n in ZOO if ZOO[n].source != "timm"])
def test_every_zoo_model_builds_offline_and_runs(name):
    model = build(name)
    x = example_inputs(name)
    y = run(model, x)
    assert torch.isfinite(y).all() and y.shape[0] == 4
    assert not model.training


@pytest.mark.parametrize("name", ["bert", "same_pad_cnn", "wav2vec2"])
def test_zoo_models_are_the_same_every_time(name):
    x = example_inputs(name)
    assert torch.equal(run(build(name), x), run(build(name), x))  # fixed seeds


def test_same_padding_convs_are_conv2d_subclasses_that_pad_in_their_forward():
    model = SamePadCNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) in (Conv2dSame, Conv2dStaticSamePadding) for m in convs)
    assert all(type(m).forward is not nn.Conv2d.forward for m in convs)
    # TensorFlow 'SAME': the output size is ceil(input / stride), whatever the input size
    conv = Conv2dSame(3, 4, 3, 2)
    assert conv(torch.randn(1, 3, 15, 15)).shape[-2:] == (8, 8)
    assert conv(torch.randn(1, 3, 16, 17)).shape[-2:] == (8, 9)


def test_the_independent_count_sees_every_weight_layer_kind():
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    elig = eligible_weights(gpt2)
    assert elig["h.0.attn.c_attn"] == 16 * 48 and elig["wte"] == 32 * 16  # HF Conv1D, Embedding
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(8, 2)
    mha.up = nn.ConvTranspose2d(2, 3, 2)
    assert eligible_weights(mha) == {"attn": 3 * 8 * 8, "attn.out_proj": 64, "up": 2 * 3 * 4}
    # unchanged model: nothing transformed; a replaced layer counts as done
    base = nn.Sequential(nn.Linear(4, 4), nn.Embedding(5, 4))
    assert own_coverage(base, base, "prune")["done"] == 0
    changed = nn.Sequential(nn.Identity(), nn.Embedding(5, 4))
    changed[1].load_state_dict(base[1].state_dict())
    cov = own_coverage(base, changed, "prune")
    assert (cov["done"], cov["eligible"], cov["left_layers"]) == (16, 36, ["1"])


def test_a_reason_names_the_whole_layer_name():
    msgs = ["prune: encoder.layer.10 is not supported", "prune: head kept: tied"]
    assert _reason_for("encoder.layer.1", msgs) is None
    assert _reason_for("encoder.layer.10", msgs) == msgs[0]
    assert _reason_for("head", msgs) == msgs[1]


# Real architectures x methods that hold every bar today; the whole matrix is docs/coverage.md.
FAST_CELLS = [
    ("same_pad_cnn", "quantize_w8a8"),  # Conv2d subclasses padding in their own forward
    ("bert", "quantize_dynamic"),
    ("resnet", "cluster"),
]


@pytest.mark.parametrize(("name", "method"), FAST_CELLS, ids=[f"{n}-{m}" for n, m in FAST_CELLS])
def test_zoo_cell_transforms_saves_and_exports(name, method, tmp_path):
    cell = run_cell(name, method, workdir=tmp_path, timeout=300)
    assert cell.runs, cell.error
    assert cell.share is not None and cell.share >= SHARE_TARGET, (cell.share, cell.left)
    assert not cell.unexplained, cell.left
    assert cell.agreement is None, cell.agreement  # the library's coverage record, where it keeps one
    if cell.library is not None:
        assert cell.library["done"] == cell.done and cell.library["eligible"] == cell.eligible
    assert cell.roundtrip, cell.roundtrip_error
    assert cell.onnx, cell.onnx_error
    assert cell.onnx_rel <= TOLERANCE[method]
    assert cell.green, cell.problems()
