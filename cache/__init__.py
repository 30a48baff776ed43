"""The HDF5 feature store: schema, fingerprint, resumable writes, locking, reading.

The error types import without h5py; everything else loads cache.store on first use."""
from .errors import CacheError, CacheInvalid, CacheLocked, CacheMismatch, CacheMissing  # noqa: F401

_STORE_API = ("FORMAT", "CacheLock", "FeatureCache", "PartialWriter", "fingerprint", "read_cache", "read_attrs",
              "files_digest")


def __getattr__(name):
    if name in _STORE_API:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
