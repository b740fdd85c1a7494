"""Clustering kernels with one CuPy/NumPy code path each (SOM, k-means, kNN, PCA, Leiden),
and host-only helpers: the Gaussian mixture of the QC scatter gate, the 1-D density learner."""
