"""The one allow-listed unpickler of the library.

``pickle`` runs whatever a file names; ckptfn never lets it. ``load`` unpickles with
a ``resolve(module, name)`` function that returns the object to use for a global,
or None to refuse it (``pickle.UnpicklingError``, or the caller's own error type).
Two allow-lists use it: the torch-free metadata reader (``ckptfn.io.peek``, inert
placeholders for torch's globals) and the DCP ``.metadata`` reader
(``ckptfn.io.dcp``, DCP's own record classes).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable

__all__ = ["Resolve", "load"]

#: Maps a global's (module, name) to the object to use, or None to refuse it.
Resolve = Callable[[str, str], object]


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, resolve: Resolve, persistent: Callable[[object], object] | None, refuse: type) -> None:
        super().__init__(file)
        self._resolve, self._persistent, self._refuse = resolve, persistent, refuse

    def find_class(self, module: str, name: str) -> object:
        if module == "__builtin__":  # pickle protocol 2 (torch.save's) spells builtins the Python 2 way
            module = "builtins"
        found = self._resolve(module, name)
        if found is None:
            raise self._refuse(f"{module}.{name} is not allowed")
        return found

    def persistent_load(self, pid: object) -> object:
        if self._persistent is None:
            raise self._refuse("persistent ids are not allowed")
        return self._persistent(pid)


def load(
    data: bytes | io.IOBase,
    resolve: Resolve,
    *,
    persistent: Callable[[object], object] | None = None,
    refuse: type[Exception] = pickle.UnpicklingError,
) -> object:
    """Unpickle ``data`` (bytes or a binary file) allowing only the globals ``resolve`` maps.

    >>> import collections, pickle
    >>> plain = {("collections", "OrderedDict"): collections.OrderedDict}
    >>> load(pickle.dumps(collections.OrderedDict(a=1)), lambda m, n: plain.get((m, n)))
    OrderedDict([('a', 1)])
    >>> load(pickle.dumps(print), lambda m, n: plain.get((m, n)))
    Traceback (most recent call last):
    ...
    _pickle.UnpicklingError: builtins.print is not allowed
    """
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return _AllowListUnpickler(file, resolve, persistent, refuse).load()
