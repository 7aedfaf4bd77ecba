"""Block-sparse matmul kernels (Triton) and their torch reference path; installed as `sparse_dc.kernels`."""
