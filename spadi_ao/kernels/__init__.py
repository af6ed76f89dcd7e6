"""Kernels for the dictionary linear ``y = (x @ D~^T) @ C^T + b`` behind one ``torch.library`` op."""

from spadi_ao.kernels.op import dictionary_linear, reference_dictionary_linear
from spadi_ao.kernels.selector import select_kernel

__all__ = ["dictionary_linear", "reference_dictionary_linear", "select_kernel"]
