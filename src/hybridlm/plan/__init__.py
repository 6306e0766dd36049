"""Pipeline planning: a cost model per block, an exact balancer that places ``|``, and a picture.

The model never imports this package; it reads a :class:`~hybridlm.config.ModelConfig` and, to
count parameters, builds the model on the meta device (free).

* :mod:`.cost` estimates each block's forward+backward time, FLOPs, bytes and memory.
* :mod:`.measure` times each block kind on a device instead (``hybridlm plan --measure``).
* :mod:`.balance` is the dynamic program over block boundaries (pure Python).
* :mod:`.planner` puts them together (``hybridlm plan``); :mod:`.plot` draws a pattern.
"""

from .balance import balanced_cuts, brute_force_cuts, even_cuts
from .cost import HARDWARE, Costs, Hardware, ItemCost, estimate_costs
from .planner import Plan, plan_pipeline

__all__ = [
    "HARDWARE",
    "Costs",
    "Hardware",
    "ItemCost",
    "Plan",
    "balanced_cuts",
    "brute_force_cuts",
    "estimate_costs",
    "even_cuts",
    "plan_pipeline",
]
