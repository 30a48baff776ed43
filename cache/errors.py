"""Cache failures by kind; the CLI turns any of them into one line, callers branch on the type."""


class CacheError(Exception):
    """A cache that cannot be used as asked; the message names the file and the fix."""


class CacheMissing(CacheError):
    """No file at the cache path (maybe an unfinished extract's .partial folder)."""
