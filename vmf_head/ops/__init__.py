"""Triton kernels, one operator per module (``log_normalizer``, ``dino_loss``, ...).

Nothing is imported here: Triton is optional, and each module imports it when the dispatch layer
first needs that module's kernels. Triton decides when a kernel module is imported whether its
kernels are compiled (CUDA tensors) or interpreted (``TRITON_INTERPRET=1``: CPU tensors too).
"""
