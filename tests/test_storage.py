"""Object-store URIs: file:// and s3:// (moto on loopback, with injected transient failures)."""
from __future__ import annotations

import pytest

from conftest import make_bucket
from cxrray.data.storage import Storage


def _roundtrip(store: Storage) -> None:
    store.write_bytes("a/one.bin", b"1" * 10)
    store.write_bytes("two.json", b"{}")
    assert store.read_bytes("a/one.bin") == b"1" * 10
    assert store.list() == ["a/one.bin", "two.json"] and store.list("a") == ["a/one.bin"]
    assert store.exists("two.json") and not store.exists("three") and store.size("a/one.bin") == 10
    store.delete("two.json")
    assert store.list() == ["a/one.bin"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")


def test_file_storage(tmp_path):
    store = Storage(f"file://{tmp_path}/root")
    _roundtrip(store)
    assert not list((tmp_path / "root").rglob("*.tmp-*")), "atomic writes leave no temp files"
    assert Storage(str(tmp_path / "root")).uri == store.uri


def test_a_job_removes_only_its_own_interrupted_writes(tmp_path, monkeypatch):
    """Temporary files carry the writer tag of the process that made them (`fanout` sets one per job), so a
    job's clean-up leaves another job's writes in flight alone; a failed write leaves no temporary file."""
    from cxrray.data.storage import WRITER_ENV

    store = Storage(f"file://{tmp_path}")
    (tmp_path / "a").mkdir()
    for name in ("a/x.json.tmp-job1-0a1b2c3d", "a/y.json.tmp-job2-0a1b2c3d", "z.tar.tmp-9f8e7d6c"):
        (tmp_path / name).write_bytes(b"partial")
    assert store.remove_partial(writer="job1-") == 1 and sorted(store.list()) == ["a/y.json.tmp-job2-0a1b2c3d",
                                                                                 "z.tar.tmp-9f8e7d6c"]
    assert store.remove_partial() == 2 and store.list() == []  # a job's start: everything interrupted before it
    monkeypatch.setenv(WRITER_ENV, "job3-")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("w.bin", b"data")
    assert store.list() == []


def test_s3_storage_retries_transient_failures(s3):
    make_bucket("roundtrip")
    store = Storage("s3://roundtrip/prefix")
    s3.fail_next_puts = 2
    before = s3.injected
    _roundtrip(store)
    assert s3.injected - before == 2 and s3.fail_next_puts == 0


def test_s3_storage_rides_out_an_endpoint_outage_within_its_retry_budget(s3):
    """Every connection reset at once (open ones closed) for 2 s: the write issued at the start of the outage
    completes once it ends, through the SDK's retries (CXRRAY_S3_MAX_ATTEMPTS=6 here: measured to give up
    after 13-22 s of refused connections on this machine), and the object is whole."""
    import time

    make_bucket("outage")
    store = Storage("s3://outage/prefix")
    store.write_bytes("warm.bin", b"0")  # a pooled connection, reset by the outage
    payload = bytes(range(256)) * 4096
    started, refused = time.monotonic(), s3.refused
    reopened = s3.outage(2.0)
    store.write_bytes("during.bin", payload)
    assert time.monotonic() - started >= 1.5, "the write must have waited out the outage"
    assert s3.refused > refused, "the client's attempts must have met the outage"
    assert store.read_bytes("during.bin") == payload and store.list() == ["during.bin", "warm.bin"]
    reopened.join(timeout=10)
    # the same through a pickled copy, as Ray hands the filesystem to its workers and Ray Train's controller
    # (pyarrow's own S3FileSystem loses its retry strategy in a pickle and gave up here within a second)
    import pickle

    copy = pickle.loads(pickle.dumps(store.fs))
    reopened, refused = s3.outage(2.0), s3.refused
    with copy.open_output_stream(store.path("pickled.bin")) as f:
        f.write(payload)
    assert s3.refused > refused and store.read_bytes("pickled.bin") == payload
    reopened.join(timeout=10)


@pytest.mark.parametrize("uri,message", [("s3://", "needs a bucket"), ("gs://b/x", "unsupported storage scheme")])
def test_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        Storage(uri)
