"""Solvers: whitening, batched OMP, K-SVD and the low-rank baseline, on plain tensors only."""
