"""Stage two: stream a cache into student training (`train(TrainConfig(...))`), or distil from
a cache inside your own trainer with the public API below (`student_trainer.api`)."""

from student_trainer.api import (
    KDCollator,
    LossSettings,
    TeacherBatch,
    cache_dataset,
    check_student,
    kd_loss,
    kd_loss_from_logits,
)
from student_trainer.config import TrainConfig
from student_trainer.losses import LOSSES
from student_trainer.train import TrainResult, train

__all__ = [
    "LOSSES",
    "KDCollator",
    "LossSettings",
    "TeacherBatch",
    "TrainConfig",
    "TrainResult",
    "cache_dataset",
    "check_student",
    "kd_loss",
    "kd_loss_from_logits",
    "train",
]
