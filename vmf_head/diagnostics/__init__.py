"""Health checks for a prototype head, to log during anyone's DINO / DINO-vMF training.

- :mod:`.prototypes`: one-off figures of a head and a batch (prototype utilisation, effective number of
  clusters, kappa statistics, near-duplicate prototypes), returned as Python numbers.
- :mod:`.collapse`: :class:`CollapseMonitor`, which follows the teacher's probabilities step by step on
  the device and, every ``every`` steps, judges them: ok, or a uniform, one-hot or partial collapse
  (:class:`CollapseReport`, and a :class:`CollapseWarning` that says what usually cures it).
"""

from .collapse import STATUSES, CollapseMonitor, CollapseReport, CollapseWarning
from .prototypes import (
    count_distinct_prototypes,
    effective_num_clusters,
    head_diagnostics,
    kappa_stats,
    near_duplicate_pairs,
    prototype_utilization,
)

__all__ = [
    "STATUSES",
    "CollapseMonitor",
    "CollapseReport",
    "CollapseWarning",
    "count_distinct_prototypes",
    "effective_num_clusters",
    "head_diagnostics",
    "kappa_stats",
    "near_duplicate_pairs",
    "prototype_utilization",
]
