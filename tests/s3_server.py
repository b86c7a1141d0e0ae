"""A real S3 API for tests: moto's server mode on 127.0.0.1 and a free port, reached through the standard
AWS environment variables (AWS_ENDPOINT_URL and dummy credentials), exactly as s3fs would reach a real
endpoint. conftest.py provides the fixtures to every test module: one server for the whole session (starting
moto's server costs seconds), and a test that asks for `s3_env` starts from an empty S3 (moto's reset API), so
every test makes the buckets it needs and sees no other test's objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from webserver import free_port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server that lives for the test session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point every AWS client in this process at the moto server, emptied first; yields the endpoint URL.

    s3fs caches filesystem instances (with the endpoint they were created for), so the cache is cleared on the
    way in and out: no test talks to another test's server.
    """
    import s3fs

    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=30).raise_for_status()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()
