"""Knowledge distillation: soft targets, feature hints, embedding distillation, one trainer."""
