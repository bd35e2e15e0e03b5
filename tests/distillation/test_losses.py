"""Distillation losses: the formulas, exactly; pooling ignores padding; adapters map widths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrinktunnel.distillation.config import OutputLoss, Pooling
from shrinktunnel.distillation.losses import (ConvAdapter, check_output_shapes, embedding_loss, feature_loss, hinton_loss,
                                         make_adapter, pool, soft_target_loss)
from shrinktunnel.errors import ModelError


def test_soft_target_loss_is_kl_of_softened_distributions_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    T = 3.0
    p = torch.softmax(t / T, -1)
    manual = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(soft_target_loss(s, t, T), manual, atol=1e-6, rtol=1e-6)
    assert float(soft_target_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_the_soft_gradient_on_the_same_scale():
    # Hinton et al.: gradients of the soft term scale as 1/T^2, hence the T^2 factor. For large T
    # the gradient approaches (s - t) / (C * N), whatever T.
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 6, generator=g) * 0.1
    grads = []
    for T in (10.0, 40.0):
        s = (torch.randn(4, 6, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_()
        soft_target_loss(s, t, T).backward()
        grads.append(s.grad.norm())
    assert float(grads[0] / grads[1]) == pytest.approx(1.0, abs=0.01)


def test_hinton_loss_mixes_soft_and_hard_with_alpha():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    soft, hard = soft_target_loss(s, t, 2.0), F.cross_entropy(s, y)
    torch.testing.assert_close(hinton_loss(s, t, y, 2.0, 0.7), 0.7 * soft + 0.3 * hard, atol=0, rtol=0)
    torch.testing.assert_close(hinton_loss(s, t, None, 2.0, 0.7), soft, atol=0, rtol=0)  # no target: soft only


def test_mask_mean_pooling_ignores_padding_exactly():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool(h, mask, Pooling.AUTO, OutputLoss.COSINE)
    h2 = h.clone()
    h2[0, 3:] = 1e6  # padding positions change: the pooled vector must not
    torch.testing.assert_close(pool(h2, mask, Pooling.MEAN, OutputLoss.KL), pooled, atol=0, rtol=0)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    assert pool(h, mask, Pooling.AUTO, OutputLoss.KL).shape == (2, 5, 3)  # kl: per position
    torch.testing.assert_close(pool(h, None, Pooling.CLS, OutputLoss.MSE), h[:, 0], atol=0, rtol=0)


def test_embedding_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(embedding_loss(a, 3 * a, OutputLoss.COSINE)) == pytest.approx(0.0, abs=1e-7)
    assert float(embedding_loss(a, -a, OutputLoss.COSINE)) == pytest.approx(2.0)
    assert float(embedding_loss(a, a + 1, OutputLoss.MSE)) == pytest.approx(1.0)


def test_token_feature_loss_counts_only_real_tokens():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    real = torch.cat([(s[0, :3] - t[0, :3]) ** 2, (s[1] - t[1]) ** 2])  # the 8 real tokens
    torch.testing.assert_close(feature_loss(s, t, mask), real.mean())
    garbage = t.clone()
    garbage[0, 3:] = 1e6  # what the teacher leaves at padding positions cannot matter
    assert torch.equal(feature_loss(s, garbage, mask), feature_loss(s, t, mask))
    assert torch.equal(feature_loss(s, t), F.mse_loss(s, t))  # no mask: plain MSE
    assert torch.equal(feature_loss(s[:, 0], t[:, 0], mask), F.mse_loss(s[:, 0], t[:, 0]))  # mask of another shape


def test_adapters_map_widths_and_refuse_other_axes():
    assert isinstance(make_adapter(torch.Size([2, 8]), torch.Size([2, 8]), "h"), nn.Identity)
    lin = make_adapter(torch.Size([2, 7, 8]), torch.Size([2, 7, 16]), "h")
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (8, 16)
    conv = make_adapter(torch.Size([2, 4, 5, 5]), torch.Size([2, 12, 5, 5]), "h")
    assert isinstance(conv, ConvAdapter) and conv.kernel_size == (1, 1) and conv.out_channels == 12
    with pytest.raises(ModelError, match="spatial"):
        make_adapter(torch.Size([2, 4, 5, 5]), torch.Size([2, 4, 10, 10]), "conv -> conv")


def test_output_shape_mismatch_says_how_to_map():
    with pytest.raises(ModelError, match=r"final layer with 12 outputs.*hints"):
        check_output_shapes(torch.zeros(2, 10), torch.zeros(2, 12), OutputLoss.KL)
    with pytest.raises(ModelError, match=r"Linear\(16, 32\)"):
        check_output_shapes(torch.zeros(2, 16), torch.zeros(2, 32), OutputLoss.COSINE)
