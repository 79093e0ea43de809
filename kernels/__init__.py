"""Triton kernels of sparsekit, installed as the package `sparsekit.kernels`.

One file per op, its launcher and autograd beside the kernel. No Triton kernel is shipped
yet: the N:M format ops run on the C++/CUDA kernels of sparsekit._C or the reference.
"""

__all__: list[str] = []
