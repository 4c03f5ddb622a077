"""Pure-function multi-modal models: encoders (free and 1-Lipschitz), the layers
they are built from (each stating its Lipschitz bound), heads, `build`,
`ModelOutput`."""

from mmsafe.checks import check_inputs
from mmsafe.models import layers, lipschitz_layers, operator_norms
from mmsafe.models.build import (MultiModalModel, as_float32, build,
                                 float32_variables)
from mmsafe.models.encoders import (ENCODERS, LIPSCHITZ_ENCODERS, LipschitzCNN, LipschitzMLP,
                                    LipschitzResNet, MLPEncoder, ResNet18, SmallCNN)
from mmsafe.models.heads import (HEADS, STIEFEL_PARAM, ConcatHead, OrthogonalHead,
                                 is_modality_weight, is_stiefel_leaf)
from mmsafe.models.operator_norms import BoundOptions
from mmsafe.models.outputs import HeadParams, ModelOutput
from mmsafe.models.transformer import MultiModalTransformer

__all__ = [
    "BoundOptions", "ENCODERS", "HEADS", "LIPSCHITZ_ENCODERS", "ConcatHead", "HeadParams",
    "LipschitzCNN", "LipschitzMLP", "LipschitzResNet", "MLPEncoder", "ModelOutput",
    "MultiModalModel", "MultiModalTransformer", "OrthogonalHead", "ResNet18", "STIEFEL_PARAM",
    "SmallCNN", "as_float32", "build", "check_inputs", "float32_variables", "is_modality_weight", "is_stiefel_leaf", "layers",
    "lipschitz_layers", "operator_norms",
]
