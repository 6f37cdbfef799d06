"""Object-store URIs: `file://PATH` (or a plain path) and `s3://bucket/prefix`, through pyarrow.fs.

S3 endpoint, region and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, ...). Transient S3 errors (5xx, throttling, resets) are
retried by the AWS SDK's standard retry strategy. Writes are atomic: a reader sees either nothing
or the whole object (local: temp file + rename; S3: a single PUT becomes visible on completion).
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs
from cxrray.errors import InputError

S3_MAX_ATTEMPTS = int(os.environ.get("CXRRAY_S3_MAX_ATTEMPTS", "8"))
WRITER_ENV = "CXRRAY_WRITER"  # a tag in the names of this process's temporary files


def s3_filesystem() -> pafs.FileSystem:
    """pyarrow's S3 filesystem configured from the standard AWS environment, rebuilt that way wherever it is
    unpickled (see `_S3FromEnvironment`)."""
    return pafs.PyFileSystem(_S3FromEnvironment())


class _S3FromEnvironment(pafs.FileSystemHandler):
    """Delegates to `_s3_from_environment()`, and pickles as "build it again from the environment here".
    Why not the S3FileSystem itself: pyarrow (25.0) drops the retry strategy when it pickles one, and Ray pickles
    the filesystem it is given (Ray Train's storage, Ray Data's readers) into every worker and its controller,
    which then gave up on an S3 outage after 0.7 s instead of riding it out (17 s with 6 attempts, measured)."""

    def __init__(self):
        self.fs = _s3_from_environment()

    def __reduce__(self):
        return (_S3FromEnvironment, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, _S3FromEnvironment)

    def equals(self, other) -> bool:
        return isinstance(other, _S3FromEnvironment)

    def get_type_name(self) -> str:
        return "cxrray-s3"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def _s3_from_environment() -> pafs.S3FileSystem:
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


class Storage:
    """A root URI and relative object names below it ("shard-000000.tar", "manifest.json")."""

    def __init__(self, uri: str | os.PathLike):
        text = str(uri)
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise InputError(f"{text!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
            self.scheme = "s3"
            self.root = posixpath.join(parsed.netloc, parsed.path.strip("/")).rstrip("/")
            self.fs: pafs.FileSystem = s3_filesystem()
        elif parsed.scheme in ("", "file"):
            local = text[len("file://"):] if parsed.scheme == "file" else text
            self.scheme = "file"
            self.root = str(Path(local).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
        else:
            raise InputError(f"{text!r}: unsupported storage scheme {parsed.scheme!r} (use file:// or s3://)")

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.root}"

    def path(self, name: str = "") -> str:
        """Filesystem path (no scheme) of an object, for pyarrow/Ray Data readers."""
        return posixpath.join(self.root, name) if name else self.root

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.path(name)}"

    def child(self, name: str) -> "Storage":
        return Storage(self.url(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        if self.scheme == "file":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # the writer tag (set per job in its worker processes: `fanout`) lets a job remove only what its own
            # lost workers left, never another job's write in flight
            tmp = f"{target}.tmp-{os.environ.get(WRITER_ENV, '')}{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def remove_partial(self, prefix: str = "", writer: str = "") -> int:
        """Delete temporary files left by writes interrupted by a kill (local only; S3 PUTs are atomic); with
        `writer`, only those of processes that ran with that writer tag."""
        mark = f".tmp-{writer}"
        partial = [n for n in self.list(prefix) if mark in n.rsplit("/", 1)[-1]] if self.scheme == "file" else []
        for name in partial:
            self.delete(name)
        return len(partial)

    def list(self, prefix: str = "") -> list[str]:
        """Names of objects below `prefix` (recursive), relative to the root, sorted."""
        base = self.path(prefix)
        info = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        start = len(self.root) + 1
        return sorted(i.path[start:] for i in info if i.type == pafs.FileType.File)
