"""Distillation losses as plain functions of tensors, and the FitNets hint adapter.

- Soft targets (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network"):
  KL(softmax(t / T) || softmax(s / T)) scaled by T^2, so that its gradients keep their size as T
  changes, mixed with the hard cross-entropy as alpha * soft + (1 - alpha) * hard.
- Hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): an intermediate student feature,
  mapped by a learned adapter where widths differ, regresses onto the teacher's feature (MSE).
- Embedding distillation (as in Sentence-BERT's multilingual distillation, Reimers & Gurevych 2020):
  cosine or MSE between pooled outputs; pooling is the attention-mask mean of the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .config import HintLoss, OutputLoss, Pooling

__all__ = ["soft_target_loss", "hinton_loss", "pool", "embedding_loss", "feature_loss", "make_adapter",
           "check_output_shapes"]


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over every position.

    The class axis is the last one; any leading axes (batch, tokens) are positions.
    """
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)  # (N, C)
    t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hinton_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
                temperature: float, alpha: float) -> torch.Tensor:
    """alpha * soft-target loss + (1 - alpha) * cross-entropy on `target` (soft term only without one)."""
    soft = soft_target_loss(student, teacher, temperature)
    if target is None or alpha == 1.0:
        return soft
    hard = F.cross_entropy(student.reshape(-1, student.shape[-1]).float(), target.reshape(-1))
    return alpha * soft + (1.0 - alpha) * hard


def pool(output: torch.Tensor, mask: torch.Tensor | None, pooling: Pooling, loss: OutputLoss) -> torch.Tensor:
    """One vector per example from a (B, T, D) output; other shapes pass through unchanged."""
    if pooling == Pooling.AUTO:
        pooling = Pooling.MEAN if loss in (OutputLoss.MSE, OutputLoss.COSINE) else Pooling.NONE
    if pooling == Pooling.NONE or output.dim() != 3:
        return output
    if pooling == Pooling.CLS:
        return output[:, 0]
    if mask is not None and mask.shape == output.shape[:2]:
        m = mask.unsqueeze(-1).to(output.dtype)  # (B, T, 1): padding tokens weigh 0
        return (output * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
    return output.mean(dim=1)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, loss: OutputLoss) -> torch.Tensor:
    """1 - cosine (per vector, over the last axis) or MSE, averaged."""
    if loss == OutputLoss.COSINE:
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                 loss: HintLoss | str = HintLoss.MSE) -> torch.Tensor:
    """MSE (or a scale-free variant) between two features; over the real tokens only when `mask`
    (B, T) matches a (B, T, D) feature: a padding position's hidden state is never read (attention
    and pooling skip it), so TinyBERT-style token distillation should not spend the student's
    capacity on it.

    `scaled_mse`: the MSE divided by the teacher feature's mean square over the same positions, so a
    layer's loss is a relative error whatever its magnitude. `cosine`: 1 - cosine per position, the
    channel axis being dim 1 of a (B, C, H, W) map and the last axis otherwise."""
    s, t = student.float(), teacher.float()
    m = None
    if mask is not None and s.dim() == 3 and tuple(mask.shape) == tuple(s.shape[:2]):
        m = mask.unsqueeze(-1).float()  # (B, T, 1)
    if loss == HintLoss.COSINE:
        per = 1.0 - F.cosine_similarity(s, t, dim=1 if s.dim() == 4 else -1)  # one value per position
        if m is None:
            return per.mean()
        return (per * m[..., 0]).sum() / m.sum().clamp_min(1.0)
    if m is None:
        mse = F.mse_loss(s, t)
        scale = t.pow(2).mean()
    else:
        count = (m.sum() * s.shape[-1]).clamp_min(1.0)
        mse = ((s - t) ** 2 * m).sum() / count
        scale = (t.pow(2) * m).sum() / count
    if loss == HintLoss.SCALED_MSE:
        return mse / scale.clamp_min(1e-12)
    return mse


def check_output_shapes(student: torch.Tensor, teacher: torch.Tensor, loss: OutputLoss) -> None:
    """Raise ModelError, saying how to map them, when the outputs cannot be compared."""
    if student.shape == teacher.shape:
        return
    s, t = tuple(student.shape), tuple(teacher.shape)
    if loss == OutputLoss.KL:
        how = (f"soft targets compare class by class, so the student must give {t[-1]} classes like the teacher: "
               f"give it a final layer with {t[-1]} outputs")
    else:
        how = (f"{loss} compares the vectors element by element: give the student an output projection to "
               f"{t[-1]} features (e.g. a Linear({s[-1]}, {t[-1]}))")
    raise ModelError(
        f"distill: the student's output has shape {s} and the teacher's {t}; {how}, or set loss: none and "
        f"distill intermediate features with hints ({{student: <module>, teacher: <module>}}), whose learned "
        f"adapter maps different widths"
    )


class ConvAdapter(nn.Conv2d):
    """1x1 convolution mapping a student feature map's channels to the teacher's (FitNets' regressor)."""


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, hint: str) -> nn.Module:
    """Identity when shapes match; a Linear on the last axis of (B, ..., D) features, or a 1x1 conv on
    the channels of (B, C, H, W) maps; ModelError when the other axes differ."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) == 4 and len(t) == 4 and s[0] == t[0] and s[2:] == t[2:]:
        return ConvAdapter(s[1], t[1], kernel_size=1)
    if len(s) == len(t) and s[:-1] == t[:-1]:
        return nn.Linear(s[-1], t[-1])
    raise ModelError(
        f"distill: hint {hint}: the student's feature has shape {s} and the teacher's {t}; an adapter maps "
        f"only the channel axis (dim 1 of a (B, C, H, W) map) or the last axis, so every other axis must agree: "
        f"choose layers whose outputs have the same spatial / token size"
    )
