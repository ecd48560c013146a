"""Shared pytest setup. Kept minimal on purpose: every area's tests run in this one process.

Triton decides whether a kernel module's kernels are compiled or interpreted when the module is
imported (``@triton.jit`` reads ``TRITON_INTERPRET`` then). Without a CUDA GPU the kernels can only
be checked through Triton's interpreter on CPU tensors, so switch it on here, before any test module
imports ``vmf_head.ops``. On a GPU machine it stays off and the same tests run the compiled kernels
on CUDA tensors. A ``TRITON_INTERPRET`` already set in the environment wins. The variable changes
nothing for code that does not use Triton kernels (the reference paths, torch.compile on the CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
