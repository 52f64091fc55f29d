"""Automatic plans: ShardParallel (intra-op sharding by integer programming over the step's
jaxpr) and AutoParallel (``method="auto"``: SPMD plans and pipelines searched together)."""
from parallel.auto._joint import AutoParallel as AutoParallel
from parallel.auto._decide import search as search
from parallel.auto._method import ShardParallel as ShardParallel
from parallel.auto._search import mesh_candidates as mesh_candidates
from parallel.auto._search import solve as solve
from parallel.auto._solution import TIE as TIE
from parallel.auto._solution import MemoryBudgetError as MemoryBudgetError
from parallel.auto._solution import Solution as Solution
from parallel.auto._solution import rank as rank
from parallel.auto._solution import simplicity as simplicity
from parallel.auto._solve import MeshResult as MeshResult

__all__ = ["TIE", "AutoParallel", "search", "MemoryBudgetError", "MeshResult", "ShardParallel", "Solution", "mesh_candidates",
           "rank", "simplicity", "solve"]
