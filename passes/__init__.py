"""Graph passes, one per module. Each rewrites one pattern and says what it changed."""
from .insert_qdq import InsertQDQ
from .normalize_graph import NormalizeGraph
from .plan_w8a8 import PlanW8A8

__all__ = ["InsertQDQ", "NormalizeGraph", "PlanW8A8"]
