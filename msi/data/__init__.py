"""Data: the MMRec layout reader, the training graph, generated data and raw-Amazon preparation."""

from msi.data.dataset import Dataset, load_dataset, load_features, read_inter
from msi.data.graph import interaction_csr, normalized_adjacency

__all__ = ["Dataset", "load_dataset", "load_features", "read_inter", "normalized_adjacency", "interaction_csr"]
