"""core.capture: one pass that hands each watched layer its real input rows."""

from __future__ import annotations

import torch
from torch import nn

from shrinktunnel.core.capture import batch_mask, capture_inputs


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)
        self.conv = nn.Conv1d(8, 2, 1)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.fc(h), self.conv(h.transpose(1, 2))


def test_linear_inputs_drop_padding_rows_and_convs_see_everything():
    model = _Tokens().eval()
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got: dict[str, list[torch.Tensor]] = {}
    seen = capture_inputs(model, {"fc": model.fc, "conv": model.conv}, [{"input_ids": ids, "attention_mask": mask}],
                          lambda name, module, x: got.setdefault(name, []).append(x))
    assert seen == 1
    h = model.emb(ids).detach()
    assert torch.equal(got["fc"][0], h[mask.bool()])  # (9, 8): the real tokens only, in order
    assert torch.equal(got["conv"][0], h.transpose(1, 2))  # a conv's input is passed whole


def test_without_a_mask_rows_are_passed_whole_and_hooks_are_removed():
    model = _Tokens().eval()
    ids = torch.randint(0, 20, (2, 4))
    got = []
    assert capture_inputs(model, {"fc": model.fc}, [ids, ids], lambda n, m, x: got.append(x.shape)) == 2
    assert got == [torch.Size([2, 4, 8])] * 2
    assert not model.fc._forward_pre_hooks
    assert batch_mask(((ids,), {})) is None
