"""Request bodies and uploaded images -> model input, or an `ApiError` with a status and a stable code.

Bodies are read with a byte budget (Content-Length is checked first, then bytes are counted while
streaming, so chunked uploads are bounded too) and multipart is parsed in memory (no spooled temp
files holding patient data). An uploaded image goes through the ingest decoder (`decode_file`) and the
exact ingest + training preprocessing (`cxrray.data.imaging.model_input`); its DICOM identifiers are
dropped at once and scrubbed from any error detail. Nothing here logs.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header

from cxrray.data.settings import DecodeConfig
from cxrray.data.dicom import RejectError, decode_file, known_identifiers
from cxrray.data.text_deid import KnownIdentifiers, scrub_message
from cxrray.data.imaging import fit_square, model_input

FILE_TYPES = {"application/dicom", "image/png", "image/jpeg", "application/octet-stream", ""}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small form fields
MAX_FIELDS = 16


class ApiError(Exception):
    """An answer other than 200: JSON {"error": code, "detail": detail} with this status."""

    def __init__(self, status: int, code: str, detail: str, **extra):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}

    @classmethod
    def from_answer(cls, answer: dict) -> "ApiError":
        """Back from {"status", "error": body()}, as a model replica returns a refused upload."""
        body = dict(answer["error"])
        return cls(answer["status"], body.pop("error"), body.pop("detail"), **body)


def check_length(headers, limit: int) -> None:
    """413 before reading when the declared Content-Length is over `limit`."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not an integer") from None
        if size > limit:
            raise ApiError(413, "payload_too_large", f"request body is {size} bytes; the limit is {limit} bytes")


async def read_body(request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as more than `limit` bytes arrive."""
    check_length(request.headers, limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[bytes, str]]]:
    """multipart/form-data -> ({field: text}, {field: (file bytes, declared media type)}), in memory."""
    if media_type(content_type) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with a `file` part, not {media_type(content_type) or 'no Content-Type'}")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(422, "invalid_multipart", "multipart/form-data without a boundary")
    parts: list[dict] = []
    state = {"name": b"", "value": b""}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})
        if len(parts) > MAX_FIELDS:
            raise ApiError(422, "invalid_multipart", f"more than {MAX_FIELDS} form parts")

    def on_header_field(data, start, end):
        state["name"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][state["name"].lower()] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({type(exc).__name__})") from None
    fields: dict[str, str] = {}
    files: dict[str, tuple[bytes, str]] = {}
    for part in parts:
        _, opts = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ApiError(422, "invalid_multipart", "a form part has no name")
        if name in fields or name in files:
            raise ApiError(422, "invalid_multipart", f"form part {name!r} given twice")
        if b"filename" in opts:
            ctype = part["headers"].get(b"content-type", b"").decode("latin-1")
            files[name] = (bytes(part["data"]), media_type(ctype))
        else:
            try:
                fields[name] = part["data"].decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, "invalid_field", f"form field {name!r} is not UTF-8 text") from None
    return fields, files


def upload_parts(fields: dict, files: dict, limit: int, names: tuple[str, ...] = ("file",)) -> list[bytes]:
    """The file parts `names` (the image in `file`, e.g. a `mask` beside it), each present, of an accepted
    type, within the byte limit; no other file part."""
    extra = sorted(set(files) - set(names))
    if extra:
        raise ApiError(422, "invalid_multipart", f"unexpected file part(s) {extra}; send "
                       + ", ".join(f"`{n}`" for n in names))
    out = []
    for name in names:
        if name not in files:
            what = "the image" if name == "file" else f"the {name}"
            raise ApiError(422, "missing_file", f"no `{name}` part: upload {what} as multipart field `{name}`"
                           + (" (it was sent as a text field)" if name in fields else ""))
        data, ctype = files[name]
        if ctype not in FILE_TYPES:
            raise ApiError(415, "unsupported_media_type", f"{name} type {ctype!r}; accepted: application/dicom, "
                                                          "image/png, image/jpeg, application/octet-stream")
        if len(data) > limit:
            raise ApiError(413, "payload_too_large", f"{name} is {len(data)} bytes; the limit is {limit} bytes")
        if not data:
            raise ApiError(422, "empty_file", f"the uploaded {name} has 0 bytes")
        out.append(data)
    return out


def _header_facts(data: bytes) -> tuple[int | None, KnownIdentifiers]:
    """(pixel count declared by the header or None when unknown, the header's identifiers)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    cols, rows = img.size
            return rows * cols, KnownIdentifiers()
        except Image.DecompressionBombError:
            return 2**62, KnownIdentifiers()  # over PIL's own limit: certainly too many
        except Exception:
            return None, KnownIdentifiers()  # let the decoder name the problem
    ds = None
    for force in (False, True):  # as the decoder reads it: a DICOM without its preamble too
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
            break
        except Exception:
            continue
    if ds is None:
        return None, KnownIdentifiers()
    scrub = known_identifiers(ds)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * max(frames, 1), scrub
    except Exception:
        return None, scrub


def decode_upload(data: bytes, decode: DecodeConfig, max_pixels: int) -> np.ndarray:
    """Upload bytes -> the decoded image, float [0, 1] [rows, cols] (identifiers dropped, never in an error)."""
    limit = min(max_pixels, decode.max_pixels)
    pixels, scrub = _header_facts(data)
    if pixels is not None and pixels > limit:
        raise ApiError(413, "too_many_pixels", f"the image declares {pixels} pixels; the limit is {limit}")
    try:
        decoded = decode_file(data, decode.model_copy(update={"max_pixels": limit}))
    except RejectError as err:
        detail = scrub_message(err.reason, scrub)
        if err.code == "absurd_dimensions" and "exceeds" in err.detail:
            raise ApiError(413, "too_many_pixels", detail) from None
        raise ApiError(422, "invalid_image", detail, reason=err.code) from None
    image = decoded.pixels
    del decoded  # header covariates and raw identifiers: never kept, returned or logged
    return image


def prepare_image(data: bytes, size: int, fit: str, decode: DecodeConfig, max_pixels: int) -> np.ndarray:
    """Upload bytes -> float32 [size, size] in [-1, 1], exactly what training saw for an ingested image."""
    return model_input(decode_upload(data, decode, max_pixels), size, fit)


def prepare_uploads(uploads: list[bytes], size: int, fit: str, decode: DecodeConfig, max_pixels: int
                    ) -> list[np.ndarray | ApiError]:
    """`prepare_image` of each upload, a refused one as its `ApiError` in its place (one bad image costs only
    its own answer). A decoder failure other than a named rejection is a 422 naming only the exception type."""
    out: list[np.ndarray | ApiError] = []
    for data in uploads:
        try:
            out.append(prepare_image(data, size, fit, decode, max_pixels))
        except ApiError as err:
            out.append(err)
        except Exception as exc:  # never its message: it may quote header text
            out.append(ApiError(422, "invalid_image", f"the image could not be decoded ({type(exc).__name__})"))
    return out


def prepare_image_and_mask(data: bytes, mask_data: bytes, size: int, fit: str, decode: DecodeConfig,
                           max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask (a PNG of the image's rows x columns; nonzero = marked) -> the model input as
    `prepare_image` and the mask float32 {0, 1} [size, size] through the same geometry (pad/crop, resize)."""
    pixels = decode_upload(data, decode, max_pixels)
    if mask_data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ApiError(422, "invalid_mask", "the mask must be a PNG (nonzero pixels mark the region)")
    rows, cols = pixels.shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(mask_data)) as img:
                if img.size != (cols, rows):  # checked on the header, before any pixel is decoded
                    raise ApiError(422, "mask_shape", f"the mask is {img.size[1]}x{img.size[0]}; the image is "
                                                      f"{rows}x{cols} (rows x columns): they must match")
                mask = np.asarray(img.convert("L") if img.mode in ("RGB", "RGBA", "P", "LA") else img)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(422, "invalid_mask", f"the mask PNG could not be read ({type(exc).__name__})") from None
    marked = (mask > 0).astype(np.float32)
    return model_input(pixels, size, fit), (fit_square(marked, size, fit) > 0.5).astype(np.float32)
