"""``vmf-head demo``: DINO, DINO with free prototype norms, and DINO-vMF trained side by side on
real images (scikit-learn's bundled digits by default), evaluated by k-NN and linear probe, with
the mixture diagnostics of ``vmf_head.diagnostics``.

Modules: ``data`` (datasets and multi-crop augmentation), ``models`` (backbone, multi-crop
wrapper), ``train`` (one run), ``evaluate`` (k-NN, linear probe), ``report`` (table, JSON,
figure), ``cli`` (the command line). scikit-learn, matplotlib and tqdm (the ``demo`` extra) are
imported only when the demo runs.
"""

from .cli import main

__all__ = ["main"]
