"""`dispatcher dev`: the whole service on one machine, and the files in ./var/ it leaves for the other commands.

`dispatcher dev` writes its Redis URL, API URL and generated API key to ./var/, so that
`dispatcher stats`, `dispatcher rq-info`, `dispatcher send-email` and the like, run from the same
directory in another terminal, use that service without any variable set.
"""

from __future__ import annotations

import base64
import os
import secrets
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from rq.serializers import JSONSerializer

from dispatcher import processes
from dispatcher.config import DEV_WEB_HOST, Settings
from dispatcher.connection import is_sentinel

#: Where `dispatcher dev` keeps its Redis data, outbox, generated credentials and URLs.
VAR_DIR = Path("var")
API_KEY_FILE = "dev-api-key"
WEBHOOK_SECRET_FILE = "dev-webhook-secret"
REDIS_URL_FILE = "redis-url"
API_URL_FILE = "api-url"
#: Seconds `dispatcher dev` waits for the API to listen before it gives up.
START_TIMEOUT = 30.0
#: Seconds the API gets to stop (gunicorn lets requests in hand finish in GRACEFUL_TIMEOUT).
WEB_STOP_TIMEOUT = 20.0


def read_var(name: str) -> str | None:
    """A value `dispatcher dev` wrote to ./var/, or None."""
    path = VAR_DIR / name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _write_var(name: str, value: str) -> None:
    path = VAR_DIR / name
    path.write_text(value + "\n")
    path.chmod(0o600)  # a URL may hold a password


def _dev_secret(name: str, make: Callable[[], str]) -> str:
    """A generated dev credential, kept in var/ so it stays the same across restarts."""
    value = read_var(name)
    if value is None:
        value = make()
        _write_var(name, value)
    return value


def _command(program: str) -> str:
    """How to run one of this environment's programs from here, activated venv or not."""
    path = Path(sys.executable).parent / program
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_dev() -> int:
    """Run the whole service locally: embedded Redis unless REDIS_URL is set, the API and one worker.

    Each child runs in a session of its own, so a terminal's Ctrl+C (SIGINT to the foreground group)
    reaches only this process, which then stops them in order: the API, the worker (it finishes the
    deliveries in flight and stops RQ's scheduler, releasing its lock) and last the embedded Redis.
    """
    from dispatcher.server import check_address_free

    env = dict(os.environ)
    VAR_DIR.mkdir(exist_ok=True)
    env.setdefault("DISPATCHER_API_KEYS", _dev_secret(API_KEY_FILE, lambda: "dev_" + secrets.token_urlsafe(24)))
    env.setdefault(
        "DISPATCHER_WEBHOOK_SECRET",
        _dev_secret(WEBHOOK_SECRET_FILE, lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()),
    )
    env.setdefault("DISPATCHER_OUTBOX_DIR", str(VAR_DIR / "outbox"))
    env.setdefault("DISPATCHER_LOG_FORMAT", "text")  # a person reads these logs
    settings = Settings.from_env(env)  # one clear line if anything is wrong, before anything starts
    settings.require_api_keys()
    settings.require_webhook_secret()
    host = settings.web_host or DEV_WEB_HOST
    env["DISPATCHER_HOST"] = host
    check_address_free(host, settings.port)
    stop = processes.StopRequest()
    server = None
    if not env.get("REDIS_URL", "").strip():
        from dispatcher.embedded import EMBEDDED_PORT, start_embedded_redis

        # The port of the last run first: the URL in var/ and in the user's notes stays right.
        last = urlsplit(read_var(REDIS_URL_FILE) or "").port
        server = start_embedded_redis(VAR_DIR / "redis", ports=(last, EMBEDDED_PORT) if last else (EMBEDDED_PORT,))
        env["REDIS_URL"] = server.connection_url
        settings = Settings.from_env(env)
    api_url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{settings.port}"
    _write_var(REDIS_URL_FILE, settings.redis_url)
    _write_var(API_URL_FILE, api_url)
    children = {}
    failed = False
    try:
        children["the API"] = processes.spawn(
            [sys.executable, "-m", "dispatcher.cli", "web"], env
        )
        children["the worker"] = processes.spawn([sys.executable, "-m", "workers"], env)
        if not processes.wait_listening(host, settings.port, list(children.values()), stop, START_TIMEOUT):
            if not stop.requested and all(child.poll() is None for child in children.values()):
                _say(f"the API did not listen on {host}:{settings.port} within {START_TIMEOUT:.0f}s")
            failed = not stop.requested
        else:
            print(_banner(settings, api_url, embedded=server is not None), flush=True)
            exited = processes.first_exit(stop, children)
            if exited is not None:
                _say(f"{exited[0]} exited with code {exited[1]}; stopping the rest")
                failed = True
    finally:
        timeouts = {"the API": WEB_STOP_TIMEOUT, "the worker": worker_stop_timeout(settings)}
        for name, child in children.items():
            processes.stop_child("dev", name, child, timeouts[name], stop)
        if server is not None:
            _say("stopping the embedded Redis")
            server.stop()
        _say("stopped")
    return 1 if failed else 0


def _banner(settings: Settings, api_url: str, embedded: bool) -> str:
    # RQ's CLI takes a Sentinel URL only from a settings module (dispatcher.connection).
    where = "-c workers.rqconfig" if is_sentinel(settings.redis_url) else f"-u {shlex.quote(settings.redis_url)}"
    serializer = f"{JSONSerializer.__module__}.{JSONSerializer.__name__}"
    outbox = settings.outbox_dir if settings.smtp is None else "off: sending through SMTP"
    return (
        "\nDispatcher is running:\n"
        f"  API        {api_url}  (try GET /readyz)\n"
        f"  API key    {settings.api_keys[0]}   (also in {VAR_DIR / API_KEY_FILE})\n"
        f"  REDIS_URL  {settings.redis_url}"
        f"{'  (embedded, data in var/redis)' if embedded else ''}  (also in {VAR_DIR / REDIS_URL_FILE})\n"
        f"  Dashboard  {api_url}/dashboard/  (rq-dashboard: any user name, the API key as password)\n"
        f"  Outbox     {outbox}\n"
        "In another terminal, from this directory:\n"
        f"  {_command('dispatcher')} stats\n"
        f"  {_command('rq')} info {where} -S {serializer}\n"
        "Press Ctrl+C to stop.\n"
    )


def _say(message: str) -> None:
    processes.say("dev", message)


def worker_stop_timeout(settings: Settings) -> float:
    """Long enough for the deliveries in flight to end by their own deadlines."""
    return max(settings.webhook_timeout, settings.smtp_timeout) + 10
