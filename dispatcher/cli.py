"""The `dispatcher` command: `dev` (everything in one), `web` (the API) and `worker`."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dispatcher.config import Settings
from dispatcher.errors import ConfigError

#: Where `dispatcher dev` keeps its Redis data, outbox and generated credentials.
DEV_VAR_DIR = Path("var")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="run Redis (embedded unless REDIS_URL is set), the API and a worker")
    commands.add_parser("web", help="serve the API with gunicorn on $PORT")
    commands.add_parser("worker", help="run a worker (with the scheduler) on $REDIS_URL")
    args = parser.parse_args(argv)
    try:
        if args.command == "web":
            return run_web()
        if args.command == "worker":
            return run_worker()
        return run_dev()
    except ConfigError as exc:
        print(f"dispatcher {args.command}: {exc}", file=sys.stderr)
        return 2


def run_web(host: str | None = None) -> int:
    """Serve the API (dispatcher.server: gunicorn, gevent workers) on `host`, settings.web_host or 0.0.0.0."""
    from dispatcher.redis_checks import warn_about_server
    from dispatcher.runtime import api_connection
    from dispatcher.server import WebServer, check_address_free

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    settings.require_api_keys()  # every check create_app makes, before gunicorn forks
    server = WebServer(settings, host)
    check_address_free(server.host, settings.port)
    connection = api_connection(settings.redis_url)
    try:
        warn_about_server(connection, logging.getLogger("dispatcher.web"))
    finally:
        connection.close()  # the workers build their own, after gevent patched them
    server.run()
    return 0


def run_worker() -> int:
    Settings.from_env().require_webhook_secret()
    # The worker is its own package (`python -m workers`): the web side never imports delivery code.
    os.execv(sys.executable, [sys.executable, "-m", "workers"])
    return 0  # not reached


def run_dev() -> int:
    """Run the whole service locally: embedded Redis unless REDIS_URL is set, the API and one worker."""
    env = dict(os.environ)
    DEV_VAR_DIR.mkdir(exist_ok=True)
    env.setdefault("DISPATCHER_API_KEYS", _dev_secret("dev-api-key", lambda: "dev_" + secrets.token_urlsafe(24)))
    env.setdefault(
        "DISPATCHER_WEBHOOK_SECRET",
        _dev_secret("dev-webhook-secret", lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()),
    )
    env.setdefault("DISPATCHER_OUTBOX_DIR", str(DEV_VAR_DIR / "outbox"))
    settings = Settings.from_env(env)  # one clear line if anything is wrong, before anything starts
    settings.require_api_keys()
    settings.require_webhook_secret()
    server = None
    if not env.get("REDIS_URL", "").strip():
        from dispatcher.embedded import start_embedded_redis

        server = start_embedded_redis(DEV_VAR_DIR / "redis")
        env["REDIS_URL"] = server.connection_url
        settings = Settings.from_env(env)
    children: list[subprocess.Popen] = []
    try:
        children.append(subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "web"], env=env))
        children.append(subprocess.Popen([sys.executable, "-m", "workers"], env=env))
        print(
            "\nDispatcher is running:\n"
            f"  API        http://127.0.0.1:{settings.port}  (try GET /readyz)\n"
            f"  API key    {settings.api_keys[0]}   (also in {DEV_VAR_DIR / 'dev-api-key'})\n"
            f"  Redis      {settings.redis_url}{' (embedded, data in var/redis)' if server else ''}\n"
            f"  Outbox     {settings.outbox_dir if settings.smtp is None else 'off: sending through SMTP'}\n"
            "Press Ctrl+C to stop.\n",
            flush=True,
        )
        _wait(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.stop()
    return 0


def _wait(children: list[subprocess.Popen]) -> None:
    """Return when a child exits or the process is asked to stop."""
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stop and all(child.poll() is None for child in children):
        time.sleep(0.2)


def _dev_secret(name: str, make: Callable[[], str]) -> str:
    """A generated dev credential, kept in var/ so it stays the same across restarts."""
    path = DEV_VAR_DIR / name
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


if __name__ == "__main__":
    sys.exit(main())
