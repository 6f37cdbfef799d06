"""Reading ustar/pax tar archives as a stream: the one tar parser of cxrray (shards and their ranges).

`tar_files` yields each regular file's (name, size); the caller reads exactly `size` bytes with `read_exact`
or drops them with `skip`. Written by hand because `tarfile` parses each header in Python (with the pax
header webdataset writes per member) as slowly as a 64² PNG decodes, and reads no partial archive strictly.
"""
from __future__ import annotations

import re
from typing import Iterator

from cxrray.errors import InputError


def tar_files(f, source: str) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file of a ustar/pax tar read as a stream from `f`; the caller reads
    exactly `size` bytes (`read_exact` or `skip`) before the next. Every header's checksum is checked; a
    truncated archive, a malformed pax record or an unknown member type is an `InputError`, never a guess."""
    pending: dict[str, str] = {}
    while True:
        header = f.read(512)
        if header == bytes(512):
            return
        if len(header) < 512:  # tar ends with zero blocks: a stream ending without them was cut
            raise InputError(f"{source}: truncated tar (a {len(header)}-byte header, no end-of-archive block)")
        stored, size = _octal(header[148:156], source), _octal(header[124:136], source)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise InputError(f"{source}: corrupt tar header (checksum) near {header[:100].rstrip(bytes(1))!r}")
        kind = header[156:157]
        name = (header[345:500].rstrip(b"\0") + b"/" if header[257:262] == b"ustar" and header[345] else b"") + \
            header[:100].rstrip(b"\0")
        if kind == b"x":  # pax extended header for the next member
            pending.update(_pax_records(read_exact(f, size, source), source))
            skip(f, -size % 512, source)
            continue
        if kind not in (b"0", b"\0", b"5", b"g"):
            raise InputError(f"{source}: unsupported tar member type {kind!r} ({name[:60]!r})")
        if "size" in pending:
            if not re.fullmatch(r"[0-9]+", pending["size"]):
                raise InputError(f"{source}: malformed pax size {pending['size'][:20]!r}")
            size = int(pending["size"])
        name_text = pending.get("path") or name.decode("utf-8", "replace")
        pending.clear()
        if kind in (b"0", b"\0"):
            yield name_text, size
        else:
            skip(f, size, source)
        skip(f, -size % 512, source)


def _octal(field: bytes, source: str) -> int:
    digits = field.strip(b"\0 ") or b"0"
    if not re.fullmatch(rb"[0-7]+", digits):
        raise InputError(f"{source}: corrupt tar header (field {field[:12]!r} is not octal)")
    return int(digits, 8)


def _pax_records(records: bytes, source: str) -> dict[str, str]:
    """A pax extended header's "LEN key=value\n" records (LEN counts the whole record)."""
    out = {}
    while records:
        length, _, _ = records.partition(b" ")
        n = int(length) if re.fullmatch(rb"[0-9]+", length) else 0
        if not len(length) + 2 < n <= len(records) or records[n - 1:n] != b"\n":
            raise InputError(f"{source}: malformed pax record {records[:40]!r}")
        key, eq, value = records[len(length) + 1:n - 1].partition(b"=")
        if not eq:
            raise InputError(f"{source}: malformed pax record {records[:40]!r}")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        records = records[n:]
    return out


def read_exact(f, n: int, source: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InputError(f"{source}: truncated tar ({len(data)} of {n} bytes of a member)")
    return data


def skip(f, n: int, source: str) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise InputError(f"{source}: truncated tar ({n} bytes missing)")
        n -= len(chunk)
