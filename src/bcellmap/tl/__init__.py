"""Tools: clustering, gating and annotation on AnnData objects (scanpy's ``tl`` style).

Every function takes an AnnData (or the cohort's AnnData objects) first, changes it in place
and returns None (or a copy with ``copy=True``), and records its settings and the bcellmap
version in ``adata.uns["bcellmap"]``. Defaults are the package defaults
(``bcellmap/defaults.yaml``); ``config=`` replaces them and keyword arguments override both.
The algorithms are those the workflow's commands run, so results equal the workflow's.

- :func:`train_som`, :func:`map_som`: the cohort SOM and metaclusters (``train-flow``,
  ``map-flow``);
- :func:`gate`, :func:`annotate`: hierarchical gates learned on the cohort
  (``thresholds``), cell types and B-cell subsets per event (``annotate``);
- :func:`pca`, :func:`neighbors`, :func:`leiden`, :func:`kmeans`: the CuPy/NumPy kernels.
"""

from ._cluster import kmeans, leiden, neighbors, pca
from ._gate import annotate, gate
from ._som import map_som, train_som

__all__ = ["train_som", "map_som", "gate", "annotate", "pca", "neighbors", "leiden", "kmeans"]
