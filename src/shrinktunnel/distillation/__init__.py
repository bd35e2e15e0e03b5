"""Knowledge distillation: soft targets, feature hints, attention relations, embedding distillation, one trainer."""

from .config import DistillConfig, Hint, HintLoss, KeepLayersConfig, OutputLoss, Pooling, Relation, Schedule
from .losses import embedding_loss, feature_loss, hinton_loss, soft_target_loss
from .relations import relation_logits, relation_loss
from .stage import distill_model, keep_layers
from .trainer import DistillLog, distill_train, lr_factor

__all__ = ["DistillConfig", "Hint", "HintLoss", "Relation", "KeepLayersConfig", "OutputLoss", "Pooling", "Schedule",
           "DistillLog", "distill_train", "distill_model", "keep_layers", "soft_target_loss", "hinton_loss",
           "embedding_loss", "feature_loss", "relation_logits", "relation_loss", "lr_factor"]
