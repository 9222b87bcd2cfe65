"""The command line's own error, and the escaping of everything it prints from its inputs.

A user mistake is reported as one line on stderr (exit status 2). Text that comes
from a file or an argument (metric names, file names, metadata strings, paths) is
printed through ``printable``, so a control character, an ANSI escape or a lone
surrogate in a file can never reach the terminal as such.

An object-store URL given as a path (``s3://bucket/run``) is looked up by
``remote_kind``; whatever goes wrong there (no such bucket or object, a protocol
fsspec does not know, its package not installed, the store unreachable) is one
``UserError`` naming the URL. Nothing here turns a URL into a local path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ckptfn.io.objectstore import store_for

__all__ = ["UserError", "described", "human_size", "printable", "remote_kind", "shown", "store_errors"]

#: Protocols whose first path component is a bucket (or container): a missing one is named as such.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
#: The extra that installs each protocol's fsspec package.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


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


def _first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, cut to 200 characters.

    >>> _first_line(OSError("no route\\nretried 5 times"))
    'no route'
    """
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Turn what an object store raises for ``url`` into one ``UserError`` line naming the URL:
    an fsspec package not installed, a protocol fsspec does not know, the store refusing or
    unreachable. ``UserError`` and ``CheckpointError`` pass unchanged.

    >>> with store_errors("nosuch://bucket/run"):
    ...     store_for("nosuch://bucket/run")
    Traceback (most recent call last):
    ...
    ckptfn.cli.errors.UserError: nosuch://bucket/run: unknown storage protocol 'nosuch' (fsspec has no file system for it)
    """
    from ckptfn.core.errors import CheckpointError

    protocol = url.split("://", 1)[0]
    try:
        yield
    except (UserError, CheckpointError):
        raise
    except ImportError as error:
        extra = _EXTRAS.get(protocol)
        hint = f" (pip install 'ckptfn[{extra}]')" if extra else ""
        raise UserError(f"{url}: {_first_line(error)}{hint}") from None
    except ValueError as error:
        if "protocol not known" in str(error).lower():
            raise UserError(f"{url}: unknown storage protocol {protocol!r} (fsspec has no file system for it)") from None
        raise UserError(f"{url}: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - the store's errors (network, credentials) as one line
        raise UserError(f"{url}: the store refused or cannot be reached ({type(error).__name__}: {_first_line(error)})") from None


def remote_kind(url: str) -> str:
    """What is at the object-store URL ``url``: ``"object"`` or ``"directory"`` (a prefix with
    objects under it, or a bucket); else a one-line ``UserError`` naming the URL.

    >>> store, key = store_for("memory://ckptfn-doc/kind/best.pt")
    >>> store.put_bytes(b"x", key)
    >>> remote_kind("memory://ckptfn-doc/kind/best.pt"), remote_kind("memory://ckptfn-doc/kind")
    ('object', 'directory')
    >>> remote_kind("memory://ckptfn-doc/nothing")
    Traceback (most recent call last):
    ...
    ckptfn.cli.errors.UserError: memory://ckptfn-doc/nothing: no such object or directory
    """
    with store_errors(url):
        store, key = store_for(url)
        if store.size(key) is not None:
            return "object"
        if store.names(key) or store.fs.isdir(key):
            return "directory"
        bucket = key.strip("/").split("/", 1)[0]
        if store.protocol in BUCKET_PROTOCOLS and bucket and not store.fs.exists(bucket):
            raise UserError(f"{url}: no such object or directory (there is no bucket {bucket!r})")
    raise UserError(f"{url}: no such object or directory")
