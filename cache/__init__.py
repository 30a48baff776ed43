"""The HDF5 feature store: attrs (the root attributes, one typed record), plan (what an extract will
write), store (fingerprint, resumable writes, locking, reading), validate (every read is checked),
reuse (what an existing cache is still good for).

The error types import without h5py; everything else loads cache.store on first use."""
from .errors import CacheError, CacheInvalid, CacheLocked, CacheMismatch, CacheMissing  # noqa: F401

_STORE_API = ("FORMAT", "CacheLock", "FeatureCache", "PartialWriter", "fingerprint", "read_cache", "read_attrs",
              "files_digest")


def __getattr__(name):
    if name in _STORE_API:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
