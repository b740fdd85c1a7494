"""Clustering kernels with one CuPy/NumPy code path each: SOM, k-means, kNN, PCA, Leiden."""
