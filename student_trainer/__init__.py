"""Stage two: stream a cache into student training (`train(TrainConfig(...))`)."""

from student_trainer.config import TrainConfig
from student_trainer.losses import LOSSES
from student_trainer.train import TrainResult, train

__all__ = ["LOSSES", "TrainConfig", "TrainResult", "train"]
