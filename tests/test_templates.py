"""Template batches (issue #11 item 1): one template, each recipient's own variables, rendered in
Jinja2's sandbox when the API accepts the batch; every template error a 422 naming the recipient and
the part, before anything is enqueued."""

from __future__ import annotations

import time

import pytest
from rq import Queue

from tests.conftest import AUTH, wait_until

TEMPLATE = {
    "subject": "Your order, {{ name }}",
    "text": "Hello {{ name }},\n{% for item in items %}- {{ item }}\n{% endfor %}",
    "html": "<p>Hello {{ name }}</p>",
}


def template_batch(recipients: list[dict], template: dict | None = None, **shared) -> dict:
    return {"template": template or TEMPLATE, "recipients": recipients, "from": "shop@example.com", **shared}


def post(svc, body: dict):
    return svc.client.post("/v1/emails/batch", json=body, headers=AUTH)


def queued(svc) -> int:
    return sum(Queue(name, connection=svc.client.application.extensions["dispatcher"].connection).count
               for name in (svc.settings.queue_name, f"{svc.settings.queue_name}-low"))


@pytest.mark.long
def test_a_thousand_recipients_get_their_own_message_and_the_batch_reaches_100_percent(service, smtp_server):
    svc = service()
    recipients = [
        {"to": [f"tpl-{n}@example.com"], "variables": {"name": f"Ada {n} <b>", "items": [f"book {n}", "pen"]}}
        for n in range(1000)
    ]
    response = post(svc, template_batch(recipients, metadata={"campaign": "winter"}))
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["batch_id"]
    svc.start_worker()
    svc.start_worker()

    def done() -> bool:
        view = svc.client.get(f"/v1/batches/{batch_id}", headers=AUTH).get_json()
        return view["percent_done"] == 100

    wait_until(done, 90, "the template batch did not finish")
    view = svc.client.get(f"/v1/batches/{batch_id}", headers=AUTH).get_json()
    assert view["by_status"]["succeeded"] == 1000
    for n in (0, 517, 999):
        (message,) = smtp_server.handler.messages_to(f"tpl-{n}@example.com")
        text = message.content.decode()
        assert f"Subject: Your order, Ada {n} <b>" in text
        assert f"Hello Ada {n} <b>,\n- book {n}\n- pen\n" in text.replace("\r\n", "\n")
        assert f"<p>Hello Ada {n} &lt;b&gt;</p>" in text  # html escapes what it shows


@pytest.mark.parametrize(
    ("template", "variables", "field", "problem"),
    [
        ({"text": "{% if %}"}, {}, "template.text", "template syntax error"),
        ({"subject": "{{ name"}, {}, "template.subject", "template syntax error"),
        ({"html": "{{ missing }}"}, {"name": "x"}, "recipients.1.html", "undefined variable"),
        ({"text": "{{ name.__class__.__mro__ }}"}, {"name": "x"}, "recipients.0.text", "not allowed"),
        ({"text": "{{ cycler.__init__.__globals__ }}"}, {}, "recipients.0.text", "not allowed"),
        ({"text": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"}, {},
         "recipients.0.text", "loops more than"),
        ({"text": "{% for a in 'x' * 90000 %}{% for b in 'y' * 90000 %}{% endfor %}{% endfor %}"}, {},
         "recipients.0.text", "loops more than"),
        ({"text": "{{ 'x' * 10 ** 9 }}"}, {}, "recipients.0.text", "not allowed"),
        ({"text": "{{ range(10 ** 9) | list }}"}, {}, "recipients.0.text", "not allowed"),
        ({"text": "{{ 9 ** 9 ** 9 }}"}, {}, "recipients.0.text", "not allowed"),
        ({"subject": "{{ name }}"}, {"name": "Hi\r\nBcc: evil@example.com"}, "recipients.0.subject", ""),
        ({"subject": "{{ name }}"}, {"name": "Hi\u2028there"}, "recipients.0.subject", ""),
    ],
    ids=lambda value: None,
)
def test_a_template_error_is_a_422_naming_the_recipient_and_part_and_nothing_is_enqueued(
    service, template, variables, field, problem
):
    """The second recipient has no variables: only a template that needs one fails on it."""
    svc = service()
    first = {"name": "ok", "missing": "given"} | variables
    recipients = [{"to": ["a@example.com"], "variables": first}, {"to": ["b@example.com"], "variables": {}}]
    started = time.monotonic()

    response = post(svc, template_batch(recipients, {"subject": "Hi", "text": "Hello"} | template))

    assert response.status_code == 422, response.get_json()
    (detail,) = response.get_json()["error"]["details"]
    assert detail["field"] == field and problem in detail["problem"], detail
    assert time.monotonic() - started < 20  # the work budget stops a hostile template
    assert queued(svc) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"to": ["a@example.com"], "subject": "s", "text": "t"}], "template": TEMPLATE}, "template"),
        ({"template": TEMPLATE}, "recipients"),
        ({"recipients": [{"to": ["a@example.com"]}]}, "template"),
        ({}, "items"),
        ({"template": {"subject": "s"}, "recipients": [{"to": ["a@example.com"]}]}, "template.text"),
        ({"template": TEMPLATE, "recipients": [{"to": ["not an address"]}]}, "recipients.0.to.0"),
    ],
)
def test_a_batch_is_items_or_a_template_with_recipients(service, body, field):
    svc = service()
    body = {"from": "shop@example.com", **body} if "template" in body else body

    response = post(svc, body)

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["details"][0]["field"] == field, response.get_json()
    assert queued(svc) == 0


# --- stored templates ------------------------------------------------------------------------


def test_a_stored_template_is_created_read_listed_replaced_and_deleted(service):
    svc = service()

    created = svc.client.post("/v1/templates", json={"subject": "Hi {{ name }}", "text": "Hello"}, headers=AUTH)
    assert created.status_code == 201, created.get_json()
    record = created.get_json()
    assert record["id"].startswith("tpl_") and created.headers["Location"] == f"/v1/templates/{record['id']}"
    assert (record["subject"], record["text"], record["html"]) == ("Hi {{ name }}", "Hello", None)
    assert svc.client.get(created.headers["Location"], headers=AUTH).get_json() == record
    listed = svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"]
    assert record in listed

    replaced = svc.client.put(created.headers["Location"], json={"subject": "Bye", "html": "<p>x</p>"}, headers=AUTH)
    assert replaced.status_code == 200
    assert (replaced.get_json()["subject"], replaced.get_json()["text"]) == ("Bye", None)
    assert replaced.get_json()["created_at"] == record["created_at"]

    assert svc.client.delete(created.headers["Location"], headers=AUTH).status_code == 204
    assert svc.client.get(created.headers["Location"], headers=AUTH).status_code == 404
    assert svc.client.delete(created.headers["Location"], headers=AUTH).status_code == 404
    again = svc.client.put(created.headers["Location"], json={"subject": "s", "text": "t"}, headers=AUTH)
    assert again.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "Hi", "text": "{% for %}"}, "text"),
        ({"subject": "{{ name", "text": "t"}, "subject"),
        ({"subject": "Hi"}, "template.text"),
        ({"text": "t"}, "subject"),
        ({"subject": "Hi\r\nBcc: x@example.com", "text": "t"}, "subject"),
    ],
)
def test_a_template_that_cannot_be_used_is_refused_when_stored_naming_the_part(service, body, field):
    svc = service()

    response = svc.client.post("/v1/templates", json=body, headers=AUTH)

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["details"][0]["field"] == field
    assert svc.client.get("/v1/templates", headers=AUTH).get_json()["templates"] == []


def test_a_batch_names_a_stored_template_by_its_id(service, smtp_server):
    svc = service()
    stored = svc.client.post("/v1/templates", json=TEMPLATE, headers=AUTH).get_json()
    recipients = [{"to": [f"stored-{n}@example.com"], "variables": {"name": f"N{n}", "items": ["x"]}} for n in range(3)]

    response = post(svc, {"template_id": stored["id"], "recipients": recipients, "from": "shop@example.com"})
    assert response.status_code == 202, response.get_json()
    svc.start_worker()

    wait_until(lambda: all(smtp_server.handler.messages_to(f"stored-{n}@example.com") for n in range(3)), 30,
               "not delivered")
    (message,) = smtp_server.handler.messages_to("stored-2@example.com")
    assert b"Subject: Your order, N2" in message.content


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"template_id": "tpl_nope"}, "template_id"), ({"template_id": "tpl_x", "template": TEMPLATE}, "template_id")],
)
def test_an_unknown_template_id_or_both_forms_are_422(service, extra, field):
    svc = service()

    response = post(svc, {"recipients": [{"to": ["a@example.com"]}], "from": "shop@example.com", **extra})

    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["details"][0]["field"] == field
    assert queued(svc) == 0


# --- a single email from a stored template ---------------------------------------------------


def store(svc, template: dict) -> str:
    response = svc.client.post("/v1/templates", json=template, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def test_a_single_email_names_a_stored_template_and_its_variables(service, smtp_server):
    svc = service()
    template_id = store(svc, TEMPLATE)
    variables = {"name": "Ada <b>", "items": ["book", "pen"]}

    response = svc.client.post(
        "/v1/emails",
        json={"to": ["Ada <single-tpl@example.com>"], "from": "shop@example.com", "template_id": template_id,
              "variables": variables, "metadata": {"order": "1042"}},
        headers=AUTH,
    )
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()["target"]["subject"] == "Your order, Ada <b>"
    svc.start_worker()

    wait_until(lambda: smtp_server.handler.messages_to("single-tpl@example.com"), 30, "not delivered")
    (message,) = smtp_server.handler.messages_to("single-tpl@example.com")
    text = message.content.decode().replace("\r\n", "\n")
    assert "Subject: Your order, Ada <b>" in text
    assert "Hello Ada <b>,\n- book\n- pen\n" in text
    assert "<p>Hello Ada &lt;b&gt;</p>" in text
    assert "template_id" not in text and "variables" not in text


def test_a_batchs_items_may_each_name_a_stored_template(service, smtp_server):
    svc = service()
    greeting = store(svc, {"subject": "Hi {{ name }}", "text": "Hello {{ name }}"})
    farewell = store(svc, {"subject": "Bye {{ name }}", "text": "Goodbye {{ name }}"})
    items = [
        {"to": [f"items-tpl-{n}@example.com"], "from": "shop@example.com",
         "template_id": (greeting, farewell)[n % 2], "variables": {"name": f"N{n}"}}
        for n in range(4)
    ]

    response = post(svc, {"items": items})
    assert response.status_code == 202, response.get_json()
    svc.start_worker()

    wait_until(lambda: all(smtp_server.handler.messages_to(f"items-tpl-{n}@example.com") for n in range(4)), 30,
               "not delivered")
    assert b"Subject: Hi N0" in smtp_server.handler.messages_to("items-tpl-0@example.com")[0].content
    assert b"Subject: Bye N3" in smtp_server.handler.messages_to("items-tpl-3@example.com")[0].content


@pytest.mark.parametrize(
    ("template", "extra", "field", "problem"),
    [
        (TEMPLATE, {"variables": {"items": []}}, "subject", "undefined variable"),
        ({"subject": "Hi", "html": "{{ x.__class__.__mro__ }}"}, {"variables": {"x": 1}}, "html", "not allowed"),
        ({"subject": "Hi", "text": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"},
         {}, "text", "loops more than"),
        ({"subject": "{{ name }}", "text": "x"}, {"variables": {"name": "Hi\r\nBcc: evil@example.com"}}, "subject", ""),
        ({"subject": "Hi", "text": "x"}, {"subject": "mine"}, "subject", "either a template_id"),
        ({"subject": "Hi", "text": "x"}, {"text": "mine"}, "text", "either a template_id"),
        ({"subject": "Hi", "text": "x"}, {"template_id": "tpl_nope"}, "template_id", "no stored template"),
        ({"subject": "Hi", "text": "x"}, {"template_id": 7}, "template_id", "string"),
        ({"subject": "Hi", "text": "x"}, {"variables": ["name"]}, "variables", "object"),
    ],
    ids=["undefined", "sandbox", "budget", "rendered-header-injection", "own-subject", "own-text", "unknown",
         "id-not-a-string", "variables-not-an-object"],
)
@pytest.mark.parametrize("form", ["single", "batch-item"])
def test_a_stored_template_error_on_an_email_is_a_422_naming_the_part_and_nothing_is_enqueued(
    service, template, extra, field, problem, form
):
    svc = service()
    email = {"to": ["a@example.com"], "from": "shop@example.com", "template_id": store(svc, template)} | extra
    started = time.monotonic()

    if form == "single":
        response = svc.client.post("/v1/emails", json=email, headers=AUTH)
    else:
        ok = {"to": ["b@example.com"], "from": "shop@example.com", "subject": "s", "text": "t"}
        response = post(svc, {"items": [ok, email]})
        field = f"items.1.{field}"

    assert response.status_code == 422, response.get_json()
    (detail,) = response.get_json()["error"]["details"]
    assert detail["field"] == field and problem in detail["problem"], detail
    assert time.monotonic() - started < 20  # the work budget stops a hostile template
    assert queued(svc) == 0


def test_variables_without_a_template_id_are_a_422(service):
    svc = service()
    email = {"to": ["a@example.com"], "from": "shop@example.com", "subject": "s", "text": "t", "variables": {"a": 1}}

    response = svc.client.post("/v1/emails", json=email, headers=AUTH)

    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["field"] == "variables"


def test_a_batch_of_items_naming_templates_shares_one_budget(service):
    """Each item within a budget of its own would let 10,000 of them hold the API for hours."""
    svc = service()
    heavy = store(svc, {"subject": "Hi", "text": "{% for a in range(60000) %}{% endfor %}"})
    items = [{"to": [f"{n}@example.com"], "from": "shop@example.com", "template_id": heavy} for n in range(5)]

    response = post(svc, {"items": items})

    assert response.status_code == 422, response.get_json()
    (detail,) = response.get_json()["error"]["details"]
    assert detail["field"] == "items.4.text" and "loops more than" in detail["problem"]
    assert queued(svc) == 0
