"""numba kernels (pooling, score fusion + top-k, skill overlap), each with a numpy reference."""
