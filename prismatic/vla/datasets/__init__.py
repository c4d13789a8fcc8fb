"""RLDS data for VLA training: dataset registry, statistics, the frame stream, synthetic data and the
LIBERO HDF5 converter.

Importing this package does not import TensorFlow; that happens when a stream is built.
"""

from prismatic.vla.datasets.libero_hdf5 import convert_libero_to_rlds
from prismatic.vla.datasets.registry import (
    DATASETS,
    MIXTURES,
    DatasetConfig,
    check_data_root,
    libero_standardize,
    resolve_mixture,
)
from prismatic.vla.datasets.rlds import RLDSStream, augment
from prismatic.vla.datasets.statistics import compute_or_load_statistics, normalize_bounds_q99, summarize
from prismatic.vla.datasets.synthetic import write_synthetic_libero

__all__ = [
    "DATASETS",
    "MIXTURES",
    "DatasetConfig",
    "RLDSStream",
    "augment",
    "check_data_root",
    "compute_or_load_statistics",
    "convert_libero_to_rlds",
    "libero_standardize",
    "normalize_bounds_q99",
    "resolve_mixture",
    "summarize",
    "write_synthetic_libero",
]
