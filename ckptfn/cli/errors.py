"""The command line's own error, and the escaping of everything it prints from its inputs.

A user mistake is reported as one line on stderr (exit status 2). Text that comes
from a file or an argument (metric names, file names, metadata strings, paths) is
printed through ``printable``, so a control character, an ANSI escape or a lone
surrogate in a file can never reach the terminal as such.
"""

from __future__ import annotations

__all__ = ["UserError", "described", "human_size", "printable", "shown"]


def printable(text: object, limit: int | None = None) -> str:
    """``text`` with every non-printable character written as its Python escape (``\\x1b``, ``\\n``,
    ``\\u202e``, ``\\udcff``), so it prints as one harmless line; cut to ``limit`` characters.

    >>> printable("val\\x1b[31m_loss\\n")
    'val\\\\x1b[31m_loss\\\\n'
    >>> printable("x" * 10, limit=4)
    'x...'
    """
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    if text.isprintable():
        return text
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return escaped if limit is None or len(escaped) <= limit else escaped[: max(limit - 3, 0)] + "..."


def shown(value: object, limit: int = 60) -> str:
    """A short, printable description of a value from a file: ``repr`` for small scalars, never the
    ``repr`` of a large or deep structure, never the digits of a huge integer.

    >>> shown("1.5"), shown(10**400), shown({"a": [1, 2]})
    ("'1.5'", 'int with 401 digits', 'dict of 1 item')
    """
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 100:
            return repr(value)
        if value.bit_length() <= 10_000:  # str() of a longer int is refused (sys.get_int_max_str_digits)
            return f"int with {len(str(abs(value)))} digits"
        return f"int with about {round(value.bit_length() * 0.30103)} digits"
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    if isinstance(value, (dict, list, tuple)):
        count = len(value)
        noun = "item" if count == 1 else "items"
        return f"{type(value).__name__} of {count} {noun}"
    return printable(type(value).__name__, limit=limit)


def described(value: object, limit: int = 60) -> str:
    """``shown`` with the type in front where ``shown`` does not say it.

    >>> described("0.4"), described(True), described([1]), described(10**400)
    ("str '0.4'", 'bool True', 'list of 1 item', 'int with 401 digits')
    """
    text = shown(value, limit)
    if isinstance(value, (dict, list, tuple)) or text.startswith("int with"):
        return text
    return f"{type(value).__name__} {text}"


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback.

    Its text is printable: control characters in the message (from a path or a file) are escaped.
    """

    def __str__(self) -> str:
        return printable(super().__str__())


def human_size(n: int) -> str:
    """A byte count for people.

    >>> human_size(512), human_size(3 * 2**20), human_size(2**30)
    ('512 B', '3.0 MiB', '1.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
