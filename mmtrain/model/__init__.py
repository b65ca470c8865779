"""Vision encoder -> projector -> language model."""

from mmtrain.model.builder import BuiltModel, build_model
from mmtrain.model.counting import count_parameters
from mmtrain.model.vlm import VisionLanguageModel

__all__ = ["BuiltModel", "VisionLanguageModel", "build_model", "count_parameters"]
