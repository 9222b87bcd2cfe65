"""Zip records read in bounded memory: byte ranges, streaming CRC32s, local headers.

What ``ckptfn.verify_checkpoint`` checks about each record of a ``torch.save`` archive
(the file's own records, or the small archives a DCP shard holds): its local header
agrees with the central directory, its bytes can be read in full, and their CRC32 is
the one the archive records. Reads go in ``CHUNK``-sized pieces into one reused
buffer, so memory stays bounded whatever the record's size.
"""

from __future__ import annotations

import io
import pathlib
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import Protocol

from ckptfn.io.archive import Window

__all__ = [
    "CHUNK",
    "Findings",
    "CRC32_IMPLEMENTATION",
    "ZIP_MAGIC",
    "Unreadable",
    "check_record",
    "check_records",
    "describe",
    "has_checksums",
    "hash_range",
    "no_checksums_note",
    "open_archive",
    "read_range",
    "without_path",
]

class Findings(Protocol):
    """Where the checks record what they found (``ckptfn.io.verify`` keeps one per checkpoint)."""

    problems: list[str]
    notes: list[str]
    records: int
    unchecked: int
    bytes_read: int
    buffer: memoryview

    def did(self, check: str) -> None: ...


CHUNK = 1 << 20  # bytes per read: small enough to stay in the CPU's cache while it is hashed
ZIP_MAGIC = b"PK\x03\x04"
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
#: A zip local file header: signature, version, flags, method, time, date, CRC32, sizes, name and extra lengths.
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_DESCRIPTOR_FLAG = 0x08  # general purpose bit 3: CRC and sizes follow the data
_UTF8_FLAG = 0x800
_ZIP64_LIMIT = 0xFFFFFFFF


def _fastest_crc32() -> tuple[Callable[[bytes, int], int], str]:
    """zlib-ng's CRC32 (SIMD, about 8x the standard library's) where installed, else zlib's."""
    try:
        from zlib_ng.zlib_ng import crc32
    except ImportError:
        return zlib.crc32, "zlib"
    return crc32, "zlib-ng"


crc32, CRC32_IMPLEMENTATION = _fastest_crc32()


class Unreadable(Exception):
    """A byte range could not be read in full (the message says where and why)."""


# --- reading -----------------------------------------------------------------------------------


def read_range(file: io.BufferedReader, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer at the end of the file)."""
    file.seek(offset)
    return file.read(size)


def hash_range(file: io.BufferedReader, offset: int, size: int, tally: Findings) -> int:
    """The CRC32 of ``size`` bytes at ``offset``, read in chunks; raises ``Unreadable``."""
    crc, done = 0, 0
    try:
        file.seek(offset)
        while done < size:
            view = tally.buffer[: min(CHUNK, size - done)]
            got = file.readinto(view)
            if not got:
                raise Unreadable(f"the file ends at offset {offset + done}, inside it")
            crc = crc32(view[:got], crc)
            done += got
    except OSError as error:
        raise Unreadable(f"cannot be read at offset {offset + done} ({describe(error)})") from error
    finally:
        tally.bytes_read += done
    return crc


def describe(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def without_path(path: pathlib.Path, error: BaseException) -> str:
    """An error's message, without the leading ``path: `` the readers put there."""
    return str(error).replace(f"{path}: ", "", 1)


# --- zip records -------------------------------------------------------------------------------


def open_archive(file: io.BufferedReader, base: int, length: int) -> list[zipfile.ZipInfo] | None:
    """The central directory of the zip archive at ``[base, base + length)``, or None if it does not parse."""
    try:
        return zipfile.ZipFile(Window(file, base, length)).infolist()
    except Exception:  # noqa: BLE001 - zipfile raises many types for a damaged archive
        return None


def has_checksums(members: Iterable[zipfile.ZipInfo]) -> bool:
    """False for an archive written without CRC32s: every record holding bytes records 0."""
    return any(member.CRC != 0 for member in members if member.file_size > 0)


def _date_time(date: int, time: int) -> tuple[int, ...]:
    """A zip header's date and time fields, decoded as ``zipfile`` decodes the central directory's.

    >>> _date_time(0, 0)
    (1980, 0, 0, 0, 0, 0)
    """
    return ((date >> 9) + 1980, (date >> 5) & 0xF, date & 0x1F, time >> 11, (time >> 5) & 0x3F, (time & 0x1F) * 2)


def _local_header_problems(header: tuple, name: bytes, member: zipfile.ZipInfo) -> list[str]:
    """How a record's local header disagrees with its central directory entry (empty: it agrees)."""
    _, version, flags, method, time, date, crc, compressed, size, _, _ = header
    decoded = name.decode("utf-8" if flags & _UTF8_FLAG else "cp437", errors="replace")
    found = []
    for what, local, central in (
        ("name", decoded, member.orig_filename),
        ("version", version, member.extract_version | member.reserved << 8),  # zipfile splits the field
        ("flags", flags, member.flag_bits),
        ("method", method, member.compress_type),
        ("date and time", _date_time(date, time), member.date_time),
    ):
        if local != central:
            found.append(f"{what} {local!r} (the central directory says {central!r})")
    sizes = (crc, compressed, size)
    central = (member.CRC, min(member.compress_size, _ZIP64_LIMIT), min(member.file_size, _ZIP64_LIMIT))
    expected = {central, (0, 0, 0), (0, _ZIP64_LIMIT, _ZIP64_LIMIT)} if flags & _DESCRIPTOR_FLAG else {central}
    if sizes not in expected:
        found.append(f"CRC32 and sizes {sizes} (the central directory says {central})")
    return found


def _descriptor_problem(descriptor: bytes, member: zipfile.ZipInfo) -> str | None:
    """How a record's data descriptor (the CRC and sizes after its bytes) disagrees with the central directory."""
    if descriptor[:4] == _DESCRIPTOR_MAGIC:
        descriptor = descriptor[4:]
    sizes = (member.compress_size, member.file_size)
    if len(descriptor) >= 12 and struct.unpack_from("<I", descriptor)[0] == member.CRC:
        if struct.unpack_from("<2I", descriptor, 4) == sizes:
            return None
        if len(descriptor) >= 20 and struct.unpack_from("<2Q", descriptor, 4) == sizes:
            return None
    return f"its data descriptor {descriptor[:20].hex()} disagrees with the central directory"


def check_record(
    file: io.BufferedReader, base: int, length: int, member: zipfile.ZipInfo, checksums: bool, tally: Findings, where: str
) -> None:
    """Check one record of the archive at ``[base, base + length)``: headers, then its bytes' CRC32."""
    label = f"{where}{member.orig_filename!r}"
    at = base + member.header_offset
    try:
        header = read_range(file, at, _LOCAL_HEADER.size)
        fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
        if fields is None or fields[0] != ZIP_MAGIC:
            tally.problems.append(f"{label}: no local header at offset {at}")
            return
        name = read_range(file, at + _LOCAL_HEADER.size, fields[9])
    except OSError as error:
        tally.problems.append(f"{label}: its header cannot be read at offset {at} ({describe(error)})")
        return
    disagreements = _local_header_problems(fields, name, member)
    if disagreements:
        tally.problems.append(f"{label}: the local header at offset {at} has " + "; ".join(disagreements))
    start = member.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    end = start + member.compress_size
    if end > length:
        tally.problems.append(
            f"{label}: its {member.compress_size} bytes at offset {base + start} run past the end "
            f"of the {'record' if where else 'file'} (offset {base + length})"
        )
        return
    try:
        crc = hash_range(file, base + start, member.compress_size, tally)
        descriptor = read_range(file, base + end, min(24, length - end)) if fields[2] & _DESCRIPTOR_FLAG else None
    except (Unreadable, OSError) as error:
        tally.problems.append(f"{label}: {error}")
        return
    if checksums:
        tally.records += 1
        if crc != member.CRC:
            tally.problems.append(
                f"{label}: CRC32 mismatch: its {member.compress_size} bytes at offset {base + start} hash to "
                f"{crc:#010x}, the central directory records {member.CRC:#010x}"
            )
    elif member.file_size:
        tally.unchecked += 1
    if descriptor is not None and (problem := _descriptor_problem(descriptor, member)):
        tally.problems.append(f"{label}: {problem} (at offset {base + end})")


def check_records(
    file: io.BufferedReader, base: int, length: int, members: list[zipfile.ZipInfo], tally: Findings, where: str = ""
) -> None:
    """Check every record of an archive whose central directory is ``members``."""
    checksums = has_checksums(members)
    for member in members:
        check_record(file, base, length, member, checksums, tally, where)
    if checksums:
        tally.did("crc32")
    tally.did("read")


def no_checksums_note(tally: Findings, what: str) -> None:
    if tally.unchecked:
        tally.notes.append(
            f"{what} written without checksums (checksums=False): the bytes of {tally.unchecked} records were "
            "read but cannot be checked against a CRC32"
        )
