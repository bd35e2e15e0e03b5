"""Knowledge distillation: soft targets, feature hints, embedding distillation, one trainer."""

from .config import DistillConfig, Hint, KeepLayersConfig, OutputLoss, Pooling, Schedule
from .losses import embedding_loss, feature_loss, hinton_loss, soft_target_loss
from .stage import distill_model, keep_layers
from .trainer import DistillLog, distill_train, lr_factor

__all__ = ["DistillConfig", "Hint", "KeepLayersConfig", "OutputLoss", "Pooling", "Schedule", "DistillLog", "distill_train",
           "distill_model", "keep_layers", "soft_target_loss", "hinton_loss", "embedding_loss",
           "feature_loss", "lr_factor"]
