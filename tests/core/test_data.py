"""Data adapters: every batch form, and clear DataErrors for data that cannot work."""

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.core import data as D
from shrinktunnel.errors import DataError
from shrinktunnel.quant.ops import affine_qparams


class Kw(nn.Module):
    def forward(self, input_ids, attention_mask):
        return (input_ids * attention_mask).float()


def test_tensor_batch():
    x = torch.randn(4, 3)
    (args, kwargs), target = D.split(x)
    assert args[0] is x and kwargs == {} and target is None


def test_pair_batch():
    x, y = torch.randn(4, 3), torch.arange(4)
    (args, kwargs), target = D.split((x, y))
    assert args[0] is x and len(args) == 1 and kwargs == {} and target is y
    (args, _), target = D.split([x, y])  # a list pair reads the same
    assert args[0] is x and target is y


def test_pair_with_several_inputs():
    a, b, y = torch.randn(2, 3), torch.randn(2, 5), torch.arange(2)
    (args, kwargs), target = D.split(((a, b), y))
    assert args == (a, b) and target is y


def test_single_item_tuple_is_inputs_without_target():
    x = torch.randn(2, 3)
    (args, _), target = D.split((x,))
    assert args[0] is x and target is None


def test_dict_batch_with_labels():
    ids, mask, labels = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.tensor([0, 1])
    (args, kwargs), target = D.split({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"} and target is labels
    assert torch.equal(D.forward(Kw(), (args, kwargs)), (ids * mask).float())


def test_dict_batch_without_labels():
    (_, kwargs), target = D.split({"input_ids": torch.ones(1, 2)})
    assert set(kwargs) == {"input_ids"} and target is None


@pytest.mark.parametrize("bad", [(torch.ones(1), torch.ones(1), torch.ones(1)), 3.5, "text"])
def test_unreadable_batch(bad):
    with pytest.raises(DataError) as info:
        D.split(bad)
    assert "a batch must be a tensor" in str(info.value)


def test_batches_of_a_list_and_of_lone_batches():
    xs = [torch.randn(2, 3) for _ in range(3)]
    assert list(D.batches(xs)) == xs
    x = torch.randn(2, 3)
    assert [b is x for b in D.batches(x)] == [True]  # a lone tensor is one batch
    pair = (torch.randn(2, 3), torch.arange(2))
    assert [b is pair for b in D.batches(pair)] == [True]  # a lone (x, y) is one batch
    d = {"a": torch.ones(1)}
    assert [b is d for b in D.batches(d)] == [True]


def test_batches_of_a_dataloader():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    got = list(D.batches(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert [len(b[0]) for b in got] == [4, 4, 2]


@pytest.mark.parametrize("empty", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_iterable_is_a_data_error(empty):
    with pytest.raises(DataError) as info:
        D.batches(empty)
    assert "empty" in str(info.value)


@pytest.mark.parametrize("bad", [42, 3.0, object()], ids=["int", "float", "object"])
def test_non_iterable_is_a_data_error(bad):
    with pytest.raises(DataError) as info:
        D.batches(bad)
    assert "not iterable" in str(info.value) and type(bad).__name__ in str(info.value)


def test_none_is_a_data_error():
    with pytest.raises(DataError) as info:
        D.batches(None)
    assert "no data" in str(info.value)


def test_take_limits_the_number_of_batches():
    xs = [torch.full((1,), float(i)) for i in range(5)]
    assert [float(b) for b in D.take(xs, 2)] == [0.0, 1.0]
    assert len(list(D.take(xs, None))) == 5


def test_first_tensor_of_various_outputs():
    t = torch.ones(2)

    class HF:
        logits = t

    assert D.first_tensor(t) is t
    assert D.first_tensor((t, "aux")) is t
    assert D.first_tensor(("aux", t)) is t
    assert D.first_tensor({"out": t}) is t
    assert D.first_tensor(HF()) is t
    with pytest.raises(DataError):
        D.first_tensor("no tensor")


def test_check_model_runs_names_the_shapes_when_forward_fails():
    model = nn.Linear(7, 2)
    with pytest.raises(DataError) as info:
        D.check_model_runs(model, [torch.randn(4, 5)])
    msg = str(info.value)
    assert "(4, 5) float32" in msg
    assert "forward failed" in msg and "shape and dtype" in msg
    assert "\n" not in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # the original error stays attached


def test_check_model_runs_names_keyword_shapes():
    with pytest.raises(DataError) as info:
        D.check_model_runs(Kw(), [{"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 4)}])
    assert "input_ids=(2, 3)" in str(info.value) and "attention_mask=(2, 4)" in str(info.value)


def test_check_model_runs_returns_the_inputs():
    x = torch.randn(3, 7)
    (args, kwargs) = D.check_model_runs(nn.Linear(7, 2), [(x, torch.zeros(3))])
    assert args[0] is x and kwargs == {}


@pytest.mark.parametrize("batch", ["tensor", "pair", "dict"])
def test_quantize_accepts_every_batch_form(batch, quiet_quantize):
    torch.manual_seed(0)
    x = torch.randn(8, 6)

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x)

    model = DictNet().eval()
    data = {"tensor": [x], "pair": [(x, torch.zeros(8, dtype=torch.long))], "dict": [{"x": x, "labels": torch.zeros(8)}]}[batch]
    q = quiet_quantize(model, None, data)
    assert type(q.fc).__name__ == "QuantizedLayer"
    # The input range observed is the range of x in every form.
    assert q.fc.input_quant.scale == affine_qparams(float(x.min()), float(x.max()), 0, 255, symmetric=False)[0]


def test_forward_failure_during_quantize_and_compress_is_a_data_error(quiet_quantize):
    model = nn.Sequential(nn.Linear(7, 2)).eval()
    bad = [torch.randn(4, 5)]
    with pytest.raises(DataError, match=r"\(4, 5\) float32"):
        quiet_quantize(model, None, bad)
    with pytest.raises(DataError, match=r"\(4, 5\) float32"):
        st.compress(model, [st.QuantConfig()], data=bad, progress=False)


def test_empty_data_in_quantize_is_a_data_error(quiet_quantize):
    with pytest.raises(DataError, match="empty"):
        quiet_quantize(nn.Sequential(nn.Linear(2, 2)), None, [])


def test_quantize_accepts_a_generator(quiet_quantize):
    torch.manual_seed(0)
    xs = [torch.randn(4, 6) for _ in range(3)]
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    q_gen = quiet_quantize(model, None, (x for x in xs))
    q_list = quiet_quantize(model, None, xs)
    assert q_gen[0].input_quant.scale == q_list[0].input_quant.scale  # every batch was observed
