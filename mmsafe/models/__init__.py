"""Pure-function multi-modal models: encoders, heads, `build`, `ModelOutput`."""

from mmsafe.models.build import MultiModalModel, build, check_inputs
from mmsafe.models.encoders import ENCODERS, MLPEncoder, ResNet18, SmallCNN
from mmsafe.models.heads import (HEADS, STIEFEL_PARAM, ConcatHead, OrthogonalHead,
                                 is_modality_weight, is_stiefel_leaf)
from mmsafe.models.outputs import HeadParams, ModelOutput
from mmsafe.models.transformer import MultiModalTransformer

__all__ = [
    "ENCODERS", "HEADS", "ConcatHead", "HeadParams", "MLPEncoder", "ModelOutput",
    "MultiModalModel", "MultiModalTransformer", "OrthogonalHead", "ResNet18", "STIEFEL_PARAM",
    "SmallCNN", "build", "check_inputs", "is_modality_weight", "is_stiefel_leaf",
]
