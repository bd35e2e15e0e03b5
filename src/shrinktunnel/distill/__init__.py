"""Knowledge distillation: soft targets, feature hints, embedding distillation, one trainer."""

from .config import DistillConfig, Hint, KeepLayersConfig, OutputLoss, Pooling
from .losses import embedding_loss, hinton_loss, soft_target_loss
from .stage import distill_model, keep_layers
from .trainer import DistillLog, distill_train

__all__ = ["DistillConfig", "Hint", "KeepLayersConfig", "OutputLoss", "Pooling", "DistillLog", "distill_train",
           "distill_model", "keep_layers", "soft_target_loss", "hinton_loss", "embedding_loss"]
