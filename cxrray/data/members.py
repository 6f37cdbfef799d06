"""Per-sample shard members beyond the image and its metadata, and the only way they are decoded.

A sample `{key}` always has `{key}.png` (the 16-bit radiograph) and `{key}.json` (metadata). It may also
carry extra members `{key}.{name}.{kind}`, passed through to training as a column `name`:

| kind | decoded as                                                                   |
|------|------------------------------------------------------------------------------|
| png  | integer array [rows, cols] of the raw stored values (8- or 16-bit: masks)    |
| npy  | numpy array via `np.load(..., allow_pickle=False)` (object arrays refused)   |
| txt  | UTF-8 string                                                                 |

Any other member is refused: nothing is ever unpickled.
"""
from __future__ import annotations

import io
import re

import numpy as np

from cxrray.data.imaging import decode_png16
from cxrray.errors import InputError

EXTRA_KINDS = ("png", "npy", "txt")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: column names the stream itself produces: an extra member may not shadow them
RESERVED = {"image", "labels", "covariates", "age", "sex", "key", "report", "png", "json"}


def split_member(ext: str, where: str) -> tuple[str, str]:
    """A member's extension after the key ('png', 'json' or 'NAME.KIND') -> (name, kind); ('', 'png') and
    ('', 'json') are the image and metadata. Raises InputError for anything else."""
    if ext in ("png", "json"):
        return "", ext
    name, _, kind = ext.rpartition(".")
    if kind not in EXTRA_KINDS or not _NAME.match(name) or name in RESERVED:
        raise InputError(f"refusing shard member {where}: only .png, .json and extra members NAME.png / NAME.npy / "
                         f"NAME.txt (NAME lower-case, not one of {sorted(RESERVED)}) are read")
    return name, kind


def encode_npy(array: np.ndarray) -> bytes:
    """An array -> the bytes of a NAME.npy member (no pickling: object arrays are refused by np.save here)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_extra(kind: str, data: bytes, where: str):
    """Bytes of an extra member of `kind` -> its value (see module table)."""
    try:
        if kind == "png":
            return decode_png16(data)
        if kind == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
        return data.decode("utf-8")
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # allow_pickle=False raises ValueError on objects
        raise InputError(f"shard member {where} is not a valid .{kind}: {exc}") from None
