"""Graph passes, one per module. Each rewrites one pattern and says what it changed."""
from .dequantize_after_gather import DequantizeAfterGather
from .fold_clipped_softmax import FoldClippedSoftmax
from .fold_conv_affine import FoldConvAffine
from .fuse_hard_swish import FuseHardSwish
from .insert_lut_weights import InsertLutWeights
from .insert_qdq import InsertQDQ
from .merge_gate_projection import MergeGateProjection
from .normalize_graph import NormalizeGraph
from .plan_w8a8 import PlanW8A8
from .sum_before_layer_norm import SumBeforeLayerNorm

__all__ = ["DequantizeAfterGather", "FoldClippedSoftmax", "FoldConvAffine", "FuseHardSwish", "InsertLutWeights", "InsertQDQ", "MergeGateProjection", "NormalizeGraph", "PlanW8A8",
           "SumBeforeLayerNorm"]
