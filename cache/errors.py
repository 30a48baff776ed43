"""Cache failures by kind; the CLI turns any of them into one line, callers branch on the type."""


class CacheError(Exception):
    """A cache that cannot be used as asked; the message names the file and the fix."""


class CacheMissing(CacheError):
    """No file at the cache path (maybe an unfinished extract's .partial folder)."""


class CacheLocked(CacheError):
    """Another live process is extracting into this cache."""


class CacheMismatch(CacheError):
    """A valid cache made with other settings or from other files than asked; --force rebuilds it."""


class CacheInvalid(CacheError):
    """A file that is not a sound feature cache: damaged, crafted or of an unknown layout; never read as one."""


REBUILD = "rebuild it with: extract ... --force"


def invalid(path, what: str) -> CacheInvalid:
    """The one message of a file that is not a sound cache: the file, what is wrong, the fix."""
    return CacheInvalid(f"cache {path} is invalid: {what}; {REBUILD}")
