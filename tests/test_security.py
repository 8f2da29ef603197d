"""Credentials and TLS: a password-protected, TLS-only Redis that checks client
certificates, refused credentials failing fast, and the Kafka security settings.

Kafka SASL/SSL are not run against the broker here: Tansu 0.6 (the embedded broker)
stalls on kafka-python's final SCRAM message and rejects `--cert` with `--key`, so the
test checks that the settings reach kafka-python as its documented options.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme
from conftest import applied, wait_for, worker_env

from config.settings import Settings, SettingsError, load_settings
from schemas.reader import SegmentReader
from worker.embedded import EmbeddedError, EmbeddedRedis, TlsFiles
from worker.generator import generate
from worker.replay import produce
from worker.sink import connect
from worker.source import ensure_topics, kafka_client_config

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, TlsFiles]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca = trustme.CA()
    out = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(out / "ca.pem")
    pairs = []
    for name, cert in (
        ("server", ca.issue_cert("127.0.0.1")),
        ("client", ca.issue_cert("segment-worker@example.com")),
    ):
        cert.cert_chain_pems[0].write_to_path(out / f"{name}.pem")
        cert.private_key_pem.write_to_path(out / f"{name}.key")
        pairs.append(TlsFiles(out / "ca.pem", out / f"{name}.pem", out / f"{name}.key"))
    return pairs[0], pairs[1]


@pytest.fixture(scope="module")
def tls_redis(pki: tuple[TlsFiles, TlsFiles]) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(password=PASSWORD, tls=pki[0])
    try:
        server.start()
    except EmbeddedError as exc:
        server.remove()
        if "tls" in str(exc).lower():
            pytest.skip("this redis-server has no TLS; install Debian's redis-server")
        raise
    yield server
    server.remove()


def test_worker_runs_on_a_password_protected_tls_redis_with_a_client_certificate(
    settings: Settings, start_worker, tls_redis: EmbeddedRedis, pki: tuple[TlsFiles, TlsFiles]
) -> None:  # type: ignore[no-untyped-def]
    client_files = pki[1]
    secured = settings.model_copy(
        update={
            "redis": load_settings(
                redis={
                    "url": tls_redis.url,
                    "ssl_ca_file": str(client_files.ca_file),
                    "ssl_cert_file": str(client_files.cert_file),
                    "ssl_key_file": str(client_files.key_file),
                }
            ).redis
        }
    )
    assert secured.redis.url.startswith(f"rediss://:{PASSWORD}@")
    ensure_topics(settings.kafka, partitions=2)
    shop = generate(users=150, events=2000, seed=3)
    produce(shop.events, settings)

    start_worker(secured).join()

    client = connect(secured.redis)
    assert applied(client, "seg") == len(shop.events)
    reader = SegmentReader(client)
    assert all(reader.get(user) is not None for user in shop.truth)
    # the same server refuses a client without the password, and one without the CA
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            "127.0.0.1", tls_redis.port, ssl=True, ssl_ca_certs=str(client_files.ca_file)
        ).ping()
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis("127.0.0.1", tls_redis.port, password=PASSWORD, ssl=True).ping()


def test_refused_redis_credentials_stop_the_worker_with_a_clear_message(
    settings: Settings,
) -> None:
    with EmbeddedRedis(password=PASSWORD) as server:
        wrong = server.url.replace(PASSWORD, "not the password")
        ran = subprocess.run(
            [sys.executable, "-m", "worker", "run"],
            env=worker_env(settings, SEGMENT_REDIS_URL=wrong),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 2
    assert "Redis refused the credentials in redis.url" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_tls_files_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"redis\.ssl_ca_file \(SEGMENT_REDIS_SSL_CA_FILE\)"):
        load_settings(redis={"url": "rediss://h:6379/0", "ssl_ca_file": str(tmp_path / "no")})
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    with pytest.raises(SettingsError, match="ssl_\\* files need a rediss:// url"):
        load_settings(redis={"url": "redis://h:6379/0", "ssl_ca_file": str(ca)})
    with pytest.raises(SettingsError, match="ssl_cert_file and ssl_key_file go together"):
        load_settings(redis={"url": "rediss://h:6379/0", "ssl_cert_file": str(ca)})


def test_kafka_security_settings_reach_the_client(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    kafka = load_settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "segment",
            "sasl_password": "secret",
            "ssl_cafile": str(ca),
        }
    ).kafka
    config = kafka_client_config(kafka)
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("segment", "secret")
    assert config["ssl_cafile"] == str(ca)
    assert "ssl_certfile" not in config


def test_the_worker_stores_ids_and_behaviour_only(
    settings: Settings, redis_client: redis.Redis, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """Events may carry more than the schema (a producer's extra fields); none of it is kept."""
    ensure_topics(settings.kafka, partitions=1)
    shop = generate(users=30, events=300, seed=8)
    marker = "jane.doe@example.com"
    produce(({**event, "email": marker, "ip": "203.0.113.9"} for event in shop.events), settings)
    start_worker(settings).join()
    wait_for(lambda: applied(redis_client, "seg") == len(shop.events))
    for key in redis_client.scan_iter("seg:*"):
        dump = redis_client.dump(key) or b""
        assert b"jane.doe" not in dump and b"203.0.113" not in dump, key
