"""The HDF5 feature store: schema, fingerprint, resumable writes, locking, reading."""
from .store import (  # noqa: F401  (the package API)
    FORMAT,
    CacheError,
    CacheLock,
    FeatureCache,
    PartialWriter,
    fingerprint,
    read_cache,
    read_attrs,
)
