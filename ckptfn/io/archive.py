"""The zip structure of a checkpoint archive, checked from its headers alone.

Every checkpoint file is a zip archive written by ``torch.save``: ``<name>/data.pkl``
holds the pickled object, ``<name>/data/<key>`` the bytes of each tensor storage, and
a few small records (``version``, ``byteorder``, ...) say how to read them.

``check_archive`` checks the structure from headers alone (one small read per member,
never the data): the end record ends the file and points at the central directory;
every member is stored uncompressed (a deflated member could be a zip bomb), once,
inside the archive's one folder, with a local header that agrees with the central
directory (signature, name, flags, sizes) and data that lies inside the file without
overlapping another member; ``data.pkl`` and ``version`` exist and the small records
parse as torch parses them. A file torch's reader would refuse is refused here
(``Damaged``, a ``CheckpointError``), so the metadata of a file that cannot be loaded
is never trusted. ``ckptfn.io.peek`` then scans ``data.pkl``.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import re
import struct
import zipfile

from ckptfn.core.errors import CheckpointError

__all__ = ["Archive", "Damaged", "Window", "check_archive", "ranges_to_read", "read_at"]


#: torch.save's version records hold a number; torch 2.13 reads versions 1 to 10.
_TORCH_FORMAT_VERSIONS = range(1, 11)
_VERSION = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]{1,20})")
#: The small records torch reads besides data.pkl, and the most bytes one may hold.
_SMALL_RECORD = 64
#: Zip flags a torch.save archive may carry: compression options (1, 2), a data descriptor (3), UTF-8 names (11).
_FLAGS = 0x1 << 1 | 0x1 << 2 | 0x1 << 3 | 0x1 << 11
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
_END = struct.Struct("<4sHHHHIIH")  # the end of central directory record (22 bytes)
_END64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_END64 = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes


@dataclasses.dataclass
class Archive:
    """A checked checkpoint archive: its record prefix (``archive/``) and where each member's bytes lie."""

    prefix: str
    members: dict[str, tuple[int, int]]  # name -> (offset of its data, size)

    def records(self) -> dict[str, int]:
        """Storage key -> size of its ``data/<key>`` record."""
        head = self.prefix + "data/"
        return {name[len(head) :]: size for name, (_, size) in self.members.items() if name.startswith(head)}


class Damaged(CheckpointError):
    """The archive's structure is not what torch.save writes (the message says where)."""


def read_at(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise Damaged(f"{size} bytes at offset {offset} lie past the end of the file")
    return data


def _central_directory(file, size: int) -> tuple[int, int, int]:
    """(offset, size, entries) of the central directory as the end record declares them, which must
    end the file (a zip comment may follow it; nothing else may)."""
    tail_size = min(size, _END.size + 0xFFFF)
    tail = read_at(file, size - tail_size, tail_size)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and (at + _END.size > len(tail) or at + _END.size + _END.unpack_from(tail, at)[7] != len(tail)):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise Damaged("no end of central directory record ends the file (bytes were appended, or it is cut)")
    end_at = size - tail_size + at
    _, disk, cd_disk, _, entries, cd_size, cd_offset, _ = _END.unpack_from(tail, at)
    if disk or cd_disk:
        raise Damaged("the archive claims to span several disks")
    saturated = entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset)
    locator = _END64_LOCATOR.unpack(read_at(file, end_at - _END64_LOCATOR.size, _END64_LOCATOR.size)) if end_at >= _END64_LOCATOR.size else None
    if locator is not None and locator[0] == b"PK\x06\x07":  # zip64 records (torch writes them for every file)
        if locator[1] or locator[3] != 1 or locator[2] + _END64.size > end_at - _END64_LOCATOR.size:
            raise Damaged("the zip64 end of central directory locator is damaged")
        record = _END64.unpack(read_at(file, locator[2], _END64.size))
        if record[0] != b"PK\x06\x06" or record[4] or record[5] or record[6] != record[7]:
            raise Damaged("the zip64 end of central directory record is damaged")
        if not saturated and (record[7], record[8], record[9]) != (entries, cd_size, cd_offset):
            raise Damaged("the zip64 and the plain end of central directory records disagree")
        end_at, (entries, cd_size, cd_offset) = locator[2], record[7:10]
    elif saturated:
        raise Damaged("the end of central directory record declares zip64 sizes, but there is no zip64 record")
    if cd_offset + cd_size != end_at:
        raise Damaged(
            f"the central directory is declared at {cd_offset}..{cd_offset + cd_size}, but its end record is at "
            f"{end_at} (bytes were inserted or removed)"
        )
    return cd_offset, cd_size, entries


def _local_sizes(header: tuple, extra: bytes, name: str) -> tuple[int, int]:
    """(compressed, uncompressed) sizes a local header declares, reading its zip64 field when needed."""
    compressed, uncompressed = header[7], header[8]
    if 0xFFFFFFFF not in (compressed, uncompressed):
        return compressed, uncompressed
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == 1 and length >= 16:
            uncompressed, compressed = struct.unpack_from("<QQ", extra, at + 4)
            return compressed, uncompressed
        at += 4 + length
    raise Damaged(f"zip member {name!r}: its local header declares zip64 sizes but holds none")


def ranges_to_read(file, size: int, small: int = 1 << 16) -> list[tuple[int, int]]:
    """The byte ranges ``check_archive`` and a read of ``data.pkl`` will touch, from the central
    directory (which ``file`` must already serve): each member's local header, and the whole
    of every member up to ``small`` bytes (``data.pkl``, ``version``, ...). A remote reader
    fetches them in one concurrent batch instead of one request per member. Damage is left
    for ``check_archive`` to report: this only guesses.
    """
    try:
        file.seek(0)
        members = zipfile.ZipFile(file).infolist()
    except Exception:  # noqa: BLE001 - check_archive reports the damage properly
        return []
    spare = 1 << 10  # local name and extra field: torch's padding field is up to 64 bytes, names are short
    ranges = []
    for member in members:
        start = member.header_offset
        length = _LOCAL.size + len(member.orig_filename.encode("utf-8", "replace")) + spare
        if member.file_size <= small or member.filename.endswith("/data.pkl"):
            length += member.compress_size
        ranges.append((start, min(size, start + length)))
    return ranges


def check_archive(file, size: int) -> Archive:
    """Every record's headers against the central directory, without reading any data."""
    cd_offset, cd_size, entries = _central_directory(file, size)
    file.seek(0)
    try:
        archive = zipfile.ZipFile(file)
    except Exception as error:  # zipfile raises many types for damaged archives
        raise Damaged(f"{type(error).__name__}: {str(error).strip()[:200]}") from None
    members = archive.infolist()
    if archive.start_dir != cd_offset:
        raise Damaged("the central directory is not where the end record declares it")
    if len(members) != entries:
        raise Damaged(f"the end record declares {entries} members; the central directory holds {len(members)}")
    directory, at = read_at(file, cd_offset, cd_size), 0
    for member in members:  # each entry's declared lengths, which zipfile does not hold against the directory's end
        if directory[at : at + 4] != b"PK\x01\x02" or at + 46 > cd_size:
            raise Damaged(f"the central directory entry of {member.filename!r} is damaged")
        at += 46 + sum(struct.unpack_from("<HHH", directory, at + 28))
    if at != cd_size:
        raise Damaged(f"the central directory's entries take {at} bytes; the end record declares {cd_size}")
    if not members:
        raise Damaged("the zip archive is empty")
    first = members[0].filename
    if "/" not in first or first.startswith("/"):
        raise Damaged(f"zip member {first!r} is not inside the archive's folder, as torch.save writes every member")
    prefix = first[: first.index("/") + 1]
    seen: dict[str, str] = {}
    spans = []
    for member in members:
        name = member.filename
        if not name.startswith(prefix) or "\0" in member.orig_filename:
            raise Damaged(f"zip member {member.orig_filename!r} is not inside {prefix!r}, where torch.save writes every member")
        if name.casefold() in seen:
            raise Damaged(f"zip member {name!r} appears twice (as {seen[name.casefold()]!r})")
        seen[name.casefold()] = name
        if member.flag_bits & 0x1:
            raise Damaged(f"zip member {name!r} is encrypted")
        if member.volume:
            raise Damaged(f"zip member {name!r} claims to start on disk {member.volume} of a multi-disk archive")
        if member.flag_bits & ~_FLAGS:
            raise Damaged(f"zip member {name!r} uses zip features torch.save never does (flags {member.flag_bits:#x})")
        if member.external_attr & 0x10 or name.endswith("/"):
            raise Damaged(f"zip member {name!r} is marked as a directory")
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"zip member {name!r} is compressed, which torch.save never does (refused: it could be a zip bomb)"
            )
        if member.file_size != member.compress_size or member.header_offset + member.compress_size > size:
            raise CheckpointError(f"zip member {name!r} claims {member.file_size} bytes, more than the {size}-byte file holds")
        if member.header_offset + _LOCAL.size > cd_offset:
            raise Damaged(f"zip member {name!r}: its local header at {member.header_offset} lies past the members' area")
        header = _LOCAL.unpack(read_at(file, member.header_offset, _LOCAL.size))
        if header[0] != b"PK\x03\x04":
            raise Damaged(f"zip member {name!r}: its local header at offset {member.header_offset} is damaged (bad signature)")
        name_size, extra_size = header[9], header[10]
        local = read_at(file, member.header_offset + _LOCAL.size, name_size + extra_size)
        encoding = "utf-8" if member.flag_bits & 0x800 else "cp437"
        if local[:name_size] != member.orig_filename.encode(encoding):
            shown = local[:name_size].decode(encoding, "replace")
            raise Damaged(f"zip member {name!r}: its local header names it {shown[:80]!r}")
        if header[3] != zipfile.ZIP_STORED or header[2] != member.flag_bits:
            raise Damaged(f"zip member {name!r}: its local header's flags or compression disagree with the central directory")
        declared = _local_sizes(header, local[name_size:], name)
        # with a data descriptor (as torch writes) the local sizes are 0 and the sizes follow the data
        if declared != (member.compress_size, member.file_size) and not (header[2] & 0x8 and declared == (0, 0)):
            raise Damaged(
                f"zip member {name!r}: its local header declares {declared[1]} bytes, the central directory "
                f"{member.file_size}"
            )
        start = member.header_offset + _LOCAL.size + name_size + extra_size
        if start + member.file_size > cd_offset:
            raise Damaged(f"zip member {name!r}: its data ({start}..{start + member.file_size}) runs into the central directory")
        spans.append((member.header_offset, start + member.file_size, name, start))
    spans.sort()
    for (_, end, before, _), (begin, _, after, _) in zip(spans, spans[1:]):
        if begin < end:
            raise Damaged(f"zip members {before!r} and {after!r} overlap")
    result = Archive(prefix, {name: (start, end - start) for _, end, name, start in spans})
    _check_records(file, result)
    return result


def _small_record(file, archive: Archive, name: str) -> bytes | None:
    found = archive.members.get(archive.prefix + name)
    if found is None:
        return None
    offset, size = found
    if size > _SMALL_RECORD:
        raise Damaged(f"record {archive.prefix + name!r} holds {size} bytes; torch.save writes a few")
    return read_at(file, offset, size)


def _check_records(file, archive: Archive) -> None:
    """The records torch's loader reads besides the tensors: data.pkl, version, byteorder, serialization id,
    alignment (each as torch 2.13 parses it)."""
    if archive.prefix + "data.pkl" not in archive.members:
        raise Damaged(f"no {archive.prefix}data.pkl member: not a torch.save archive")
    version = _small_record(file, archive, ".data/version")
    version = _small_record(file, archive, "version") if version is None else version
    if version is None:
        raise Damaged(f"no {archive.prefix}version record, which torch.save always writes")
    number = _VERSION.match(version)
    if number is None or int(number[1]) not in _TORCH_FORMAT_VERSIONS:
        raise Damaged(f"version record {version[:20]!r}: torch reads format versions 1 to 10")
    byteorder = _small_record(file, archive, "byteorder")
    if byteorder is not None and byteorder not in (b"little", b"big"):
        raise Damaged(f"byteorder record {byteorder[:20]!r} is neither 'little' nor 'big'")
    serialization_id = _small_record(file, archive, ".data/serialization_id")
    if serialization_id is not None:
        try:
            serialization_id.decode("utf-8")
        except UnicodeDecodeError:
            raise Damaged(f".data/serialization_id record {serialization_id[:20]!r} is not UTF-8 text") from None
    alignment = _small_record(file, archive, ".storage_alignment")
    if alignment is not None:
        try:
            int(alignment)
        except ValueError:
            raise Damaged(f".storage_alignment record {alignment[:20]!r} is not a number") from None


class Window(io.RawIOBase):
    """Bytes ``[base, base + length)`` of an open file as a read-only seekable file (for ``zipfile``)."""

    def __init__(self, file: io.BufferedReader, base: int, length: int) -> None:
        super().__init__()
        self._file, self._base, self._length, self._position = file, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        if start + offset < 0:
            raise OSError(errno.EINVAL, "seek before the start")
        self._position = start + offset
        return self._position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), max(0, self._length - self._position))
        if count == 0:
            return 0
        self._file.seek(self._base + self._position)
        got = self._file.readinto(memoryview(buffer).cast("B")[:count]) or 0
        self._position += got
        return got
