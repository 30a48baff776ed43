"""Text from users' files made safe to print: names with newlines or terminal escape codes are shown escaped."""
from __future__ import annotations


def printable(s: str) -> str:
    """s with control characters and other non-printables as backslash escapes (\\n, \\x1b, \\u200b, and
    \\udcff for bytes that were not UTF-8); ordinary unicode (accents, CJK, emoji) is left alone."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)
