"""Names from the disk shown safely: file and class names may hold newlines, terminal escape codes or
bytes that are not UTF-8; printed raw they break tables or send control codes to the terminal."""
from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(s: str) -> str:
    """s with every control or invisible-formatting character escaped; the undecodable bytes of a
    file name (surrogateescape, as os.listdir returns them) shown as \\xNN. Letters of any script stay."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte of a file name
            out.append(f"\\x{o - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):  # controls, bidi overrides...
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def printable_lines(text: str) -> str:
    """text with every line escaped as printable does, its line breaks kept (a report read back from disk)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not valid UTF-8 (surrogate-escaped by the OS layer)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
