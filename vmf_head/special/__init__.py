"""Special functions for von Mises-Fisher models: log I_nu, the Bessel ratio, log C_p and A_p.

The public, user-facing functions here take and return tensors of any floating dtype and device;
the module ``vmf_head.special.vmf`` holds the float64 kernels they are built from.
"""

from .bessel import bessel_iv_ratio, log_bessel_iv

__all__ = ["bessel_iv_ratio", "log_bessel_iv"]
