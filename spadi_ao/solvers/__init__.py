"""Solvers: whitening, batched OMP, K-SVD and the low-rank baseline, on plain tensors only."""

BLOCK_ELEMENTS = 1 << 22
"""Elements per block of the blockwise passes over a wide layer's matrices (32 MiB of float64 scratch),
which keep their temporaries at one block instead of a full-size copy."""
