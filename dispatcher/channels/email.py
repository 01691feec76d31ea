"""The email channel, what to send: the request, the payload a job carries, its description.

The worker's side (building the MIME message, SMTP or the outbox) is `workers.channels.email`.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import NotRequired, TypedDict  # noqa: UP035  # pydantic needs TypedDict from here on Python < 3.12

from dispatcher.addresses import AddressError, split_mailbox, wire_address
from dispatcher.channels import PAYLOAD_VERSION, Channel, JobParts
from dispatcher.config import Settings
from dispatcher.errors import FieldProblem
from dispatcher.models import (
    MAX_BATCH,
    MAX_EMAIL_HEADER_NAME,
    NO_LINE_BREAKS,
    Mailbox,
    Metadata,
    RequestModel,
    RetryPolicy,
    SafeStr,
    SendBatch,
    SendRequest,
    _check_headers,
    _items_without_priority,
    case_insensitive,
    header_name_pattern,
    headers_schema,
    resolve_retry,
)

NAME = "email"

MAX_RECIPIENTS = 50
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*/[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: Header names the email builder sets itself, from the request's own fields.
RESERVED_EMAIL_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "sender",
    }
)



def attachment_type_problem(value: str) -> str | None:
    """What is wrong with an attachment's content type, or None; the worker checks job data with it too."""
    if len(value) > 255 or not _CONTENT_TYPE.fullmatch(value):
        return "must be a MIME type, type/subtype"
    if value.partition("/")[0].lower() in ("multipart", "message"):
        # A multipart attachment would need a boundary and a message/* one 7bit or 8bit content
        # (RFC 2046); attachments go as base64. Send such content as application/octet-stream.
        return "must not be multipart/* or message/* (send it as application/octet-stream)"
    return None


def _attachment_type(value: str) -> str:
    problem = attachment_type_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: The document's pattern for a content type: _CONTENT_TYPE, and neither multipart/* nor message/*.
_CONTENT_TYPE_SCHEMA = (
    f"^(?!{case_insensitive('multipart/')}|{case_insensitive('message/')}){_CONTENT_TYPE.pattern.removeprefix('^')}"
)
#: Standard base64 with its padding, what b64decode(validate=True) accepts.
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class Attachment(RequestModel):
    filename: Annotated[SafeStr, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[
        str,
        StringConstraints(max_length=255, pattern=_CONTENT_TYPE.pattern),
        AfterValidator(_attachment_type),
        Field(json_schema_extra={"pattern": _CONTENT_TYPE_SCHEMA}),
    ] = "application/octet-stream"
    content: str = Field(description="base64", json_schema_extra={"format": "byte", "pattern": _BASE64})

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be valid base64") from None
        return value

    def decoded_size(self) -> int:
        return len(base64.b64decode(self.content))


_RECIPIENTS = f"to, cc and bcc together hold at most {MAX_RECIPIENTS} addresses"
_APPLICATION = (
    "an application's id (POST /v1/applications): its endpoints receive the email.delivered, email.failed "
    "and email.suppressed events of this email"
)


def _known_application(value: str | None, info: ValidationInfo) -> str | None:
    """An email's `application` must name one of this queue's applications (the API's validation
    context says which exist; without one, as in the worker's own checks, it is taken as it is)."""
    known = (info.context or {}).get("applications")
    if value is not None and known is not None and not known(value):
        raise ValueError("no application has this id (POST /v1/applications makes one)")
    return value


#: The application an email's events go to (workers.email_events).
ApplicationId = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_known_application)]
_EMAIL_HEADER_NAME = header_name_pattern(RESERVED_EMAIL_HEADERS, ("content-", "resent-"), MAX_EMAIL_HEADER_NAME)


def _message_forms(schema: dict) -> None:
    """The document says what the validators do: a subject with text, html or both; or a stored
    template's id (and its variables) instead of all three."""
    schema["required"].remove("subject")
    schema["oneOf"] = [
        {
            "required": ["subject"],
            "anyOf": [{"required": [name], "properties": {name: {"type": "string"}}} for name in ("text", "html")],
            "properties": {"template_id": False, "variables": False},
        },
        {"required": ["template_id"], "properties": {"subject": False, "text": False, "html": False}},
    ]


class EmailRequest(SendRequest):
    model_config = ConfigDict(json_schema_extra=lambda schema: _message_forms(schema))  # type: ignore[misc]

    # Each recipient `addr` or `Display Name <addr>`, as `from`: the worker encodes the names and
    # puts only the addresses in the SMTP envelope (workers.mail).
    to: list[Mailbox] = Field(min_length=1, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    cc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    bcc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    from_: Mailbox | None = Field(default=None, alias="from")
    reply_to: Mailbox | None = None
    subject: Annotated[SafeStr, StringConstraints(min_length=1, max_length=998)]
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = Field(
        default=[], max_length=100, description=f"at most {MAX_ATTACHMENT_BYTES} bytes in total once decoded"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=headers_schema(_EMAIL_HEADER_NAME, NO_LINE_BREAKS)
    )
    metadata: Metadata = Field(default_factory=dict)
    retry: RetryPolicy | None = None
    # Not nullable: absent, not null, when the message gives its own parts.
    template_id: str = Field(  # type: ignore[assignment]
        default=None,
        min_length=1,
        max_length=64,
        description="a stored template's id (POST /v1/templates): its subject, text and html, rendered with "
        "`variables`, instead of the message's own",
    )
    variables: dict[str, JsonValue] = Field(default=None, description="the stored template's variables")  # type: ignore[arg-type]
    # Not nullable: absent, not null, when the email's events go to no application.
    application: ApplicationId = Field(default=None, description=_APPLICATION)  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _from_template(cls, data: Any, info: ValidationInfo) -> Any:
        """With a `template_id`, the stored template rendered with `variables` gives the subject,
        text and html, before they are checked as if the request had given them."""
        if not isinstance(data, dict) or "template_id" not in data:
            if isinstance(data, dict) and "variables" in data:
                raise FieldProblem("variables", "give variables with a template_id")
            return data
        # Imported here, not at the top: jinja2 is a tenth of a worker's start-up, and workers never render.
        from dispatcher.templates import FIELDS, RenderBudget, TemplateProblem, compiled_stored

        template_id, variables = data["template_id"], data.get("variables", {})
        given = [part for part in FIELDS if part in data]
        if given:
            raise FieldProblem(given[0], "give either a template_id or the message's subject, text and html")
        if not isinstance(template_id, str):
            raise FieldProblem("template_id", "must be a string")
        if not isinstance(variables, dict):
            raise FieldProblem("variables", "must be an object")
        stored = (info.context or {}).get("templates", lambda _: None)(template_id)
        if stored is None:
            raise FieldProblem("template_id", "no stored template has this id (POST /v1/templates makes one)")
        with RenderBudget():
            try:
                parts = compiled_stored(stored).render(variables)
            except TemplateProblem as exc:
                raise FieldProblem(exc.field, f"template {template_id}: {exc.message}") from None
        return data | parts

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        _check_headers(value, RESERVED_EMAIL_HEADERS, "content-")
        return value

    @model_validator(mode="after")
    def _whole_message(self, info: ValidationInfo) -> EmailRequest:
        if self.text is None and self.html is None:
            raise FieldProblem("text", "give text, html or both")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise FieldProblem("to", f"to, cc and bcc together may hold at most {MAX_RECIPIENTS} addresses")
        if sum(a.decoded_size() for a in self.attachments) > MAX_ATTACHMENT_BYTES:
            raise FieldProblem(
                "attachments", f"attachments may total at most {MAX_ATTACHMENT_BYTES} bytes once decoded"
            )
        if self.from_ is None:
            default = (info.context or {}).get("email_from")
            if not default:
                raise FieldProblem("from", "required: no default sender (DISPATCHER_EMAIL_FROM) is configured")
            self.from_ = default
        return self


class EmailTemplate(RequestModel):
    """Jinja2 (sandboxed) templates of a message's parts; `html` escapes every variable it shows."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [{"required": [name], "properties": {name: {"type": "string"}}} for name in ("text", "html")]
        }
    )

    subject: Annotated[SafeStr, StringConstraints(min_length=1, max_length=998)]
    text: str | None = None
    html: str | None = None

    @model_validator(mode="after")
    def _a_body(self) -> EmailTemplate:
        if self.text is None and self.html is None:
            raise FieldProblem("template.text", "give text, html or both")
        return self


class Recipient(RequestModel):
    """One message of a template batch: its recipients and the template's variables for them."""

    to: list[Mailbox] = Field(min_length=1, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    cc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    variables: dict[str, JsonValue] = Field(default_factory=dict)


#: Decoded attachment bytes a template batch may make in all (each message carries its copy).
MAX_TEMPLATE_ATTACHMENTS = 50 * 1024 * 1024
#: The fields of an email every message of a template batch shares.
_SHARED = ("from", "reply_to", "bcc", "attachments", "headers", "metadata", "retry", "application")
_TEMPLATE_FORM = ("template", "template_id", "recipients", *_SHARED)


class EmailBatch(SendBatch):
    """Emails accepted together: all of them or, if any item is invalid, none. Either `items`, each a
    whole email, or a `template` rendered for each of `recipients` with their own `variables`
    (with the fields all its messages share: from, reply_to, bcc, attachments, headers, metadata,
    retry, application); a template error names the recipient and the part."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _batch_forms(schema))  # type: ignore[misc]

    items: list[EmailRequest] = Field(default_factory=list, max_length=MAX_BATCH)
    # Not nullable: absent, not null, in the items form.
    template: EmailTemplate = Field(default=None)  # type: ignore[assignment]
    template_id: str = Field(  # type: ignore[assignment]
        default=None, min_length=1, max_length=64, description="a stored template's id (POST /v1/templates)"
    )
    recipients: list[Recipient] = Field(default_factory=list, max_length=MAX_BATCH)
    from_: Mailbox | None = Field(default=None, alias="from")
    reply_to: Mailbox | None = None
    bcc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    attachments: list[Attachment] = Field(default=[], max_length=100)
    headers: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=headers_schema(_EMAIL_HEADER_NAME, NO_LINE_BREAKS)
    )
    metadata: Metadata = Field(default_factory=dict)
    retry: RetryPolicy | None = None
    application: ApplicationId = Field(default=None, description=_APPLICATION)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _render(self, info: ValidationInfo) -> EmailBatch:
        given = [name for name in _TEMPLATE_FORM if name.replace("from", "from_") in self.model_fields_set]
        if self.items:
            if given:
                raise FieldProblem(given[0], "give either items or a template with recipients, not both")
            return self
        from dispatcher.templates import RenderBudget, TemplateProblem, compile_template  # not at the top: see above

        if self.template is not None and self.template_id is not None:
            raise FieldProblem("template_id", "give a template or a template_id, not both")
        if self.template_id is not None:
            stored = (info.context or {}).get("templates", lambda _: None)(self.template_id)
            if stored is None:
                raise FieldProblem("template_id", "no stored template has this id (POST /v1/templates makes one)")
            self.template = EmailTemplate.model_construct(**{f: stored.get(f) for f in ("subject", "text", "html")})
        if self.template is None or not self.recipients:
            missing = "template" if self.template is None else "recipients"
            raise FieldProblem("items" if not given else missing, "give items, or a template and its recipients")
        try:
            compiled = compile_template(self.template.model_dump())
        except TemplateProblem as exc:
            raise FieldProblem(f"template.{exc.field}", exc.message) from None
        attached = sum(a.decoded_size() for a in self.attachments)
        if attached * len(self.recipients) > MAX_TEMPLATE_ATTACHMENTS:
            raise FieldProblem(
                "attachments", f"attachments times recipients may total at most {MAX_TEMPLATE_ATTACHMENTS} bytes"
            )
        # Validated once here, these pass into each message as they are (pydantic keeps instances).
        shared = {
            "from": self.from_, "reply_to": self.reply_to, "bcc": self.bcc, "attachments": self.attachments,
            "headers": self.headers, "metadata": self.metadata, "retry": self.retry, "application": self.application,
        }
        items = []
        with RenderBudget():
            for i, recipient in enumerate(self.recipients):
                try:
                    parts = compiled.render(recipient.variables)
                except TemplateProblem as exc:
                    raise FieldProblem(f"recipients.{i}.{exc.field}", exc.message) from None
                email = {name: value for name, value in shared.items() if value is not None}
                email |= parts | {"to": recipient.to, "cc": recipient.cc}
                try:
                    items.append(EmailRequest.model_validate(email, context=info.context))
                except ValidationError as exc:
                    raise _recipient_problem(i, exc) from None
        self.items = items
        return self


def _recipient_problem(index: int, exc: ValidationError) -> FieldProblem:
    """A rendered message's first problem, named after its recipient: `recipients.<i>.<field>`."""
    error = exc.errors(include_url=False, include_input=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return FieldProblem(f"recipients.{index}.{cause.field}", cause.problem)
    field = ".".join(map(str, error["loc"])) or "body"
    return FieldProblem(f"recipients.{index}.{field}", error["msg"].removeprefix("Value error, "))


def _batch_forms(schema: dict) -> None:
    """The document says what the validator does: items alone, or a template, recipients and the
    shared fields, never both."""
    _items_without_priority(schema)
    form_fields = {name: False for name in _TEMPLATE_FORM}
    schema["oneOf"] = [
        {"required": ["items"], "properties": {"items": {"minItems": 1}, **form_fields}},
        {
            "required": ["recipients"],
            "oneOf": [{"required": ["template"]}, {"required": ["template_id"]}],
            "properties": {"recipients": {"minItems": 1}, "items": False},
        },
    ]


#: An email job's payload (version 2): the request as the API normalized it (`from`, `reply_to` and
#: each recipient a mailbox: `address` or `"Name" <address>`), and what acceptance fixed:
#: `message_id` (`<job id@sender's domain>`) and `date` (Unix time), the same on every retry. The
#: worker checks every field again (workers.mail): Redis is writable by others.
EmailPayload = TypedDict(
    "EmailPayload",
    {
        "v": int,
        "channel": str,
        "from": str,
        "to": list[str],
        "cc": list[str],
        "bcc": list[str],
        "reply_to": str,
        "subject": str,
        "text": str,
        "html": str,
        "attachments": list[dict[str, str]],
        "headers": dict[str, str],
        "message_id": str,
        "date": float,
        "retry": dict,
        # An email that names an application: the worker publishes its events there, with its metadata.
        "application": str,
        "metadata": dict[str, Any],
    },
    total=False,
)


#: Emails: SMTP connect, TLS, login and a 10 MB DATA take longer than one webhook POST.
EMAIL_JOB_TIMEOUT = 300


#: Request fields the job's payload leaves out: the job's meta holds the first two (the payload
#: holds the metadata too when the email names an application: its events carry it), the queue
#: says when, and a template's parts are rendered into the message.
_NOT_SENT = {"metadata", "retry", "send_at", "template_id", "variables"}


def job(request: EmailRequest, job_id: str, accepted_at: datetime, settings: Settings) -> JobParts:
    """Message-ID and Date are fixed at acceptance, so every retry sends the same message; the Date
    of a scheduled email is its send_at (mail readers sort by it)."""
    sender = request.from_
    assert sender is not None  # the model fills the default sender or rejects the request
    payload = request.model_dump(by_alias=True, exclude=_NOT_SENT, exclude_none=True) | {
        "v": PAYLOAD_VERSION,
        "channel": NAME,
        "message_id": f"<{job_id}@{_ascii_domain(sender)}>",
        "date": (request.send_at or accepted_at).timestamp(),
        "retry": resolve_retry(request.retry, settings.email_retry),
    }
    target = EmailTarget(to=request.to, cc=request.cc, bcc=request.bcc, subject=request.subject)
    if request.application is not None:
        # The worker publishes the email's events (workers.channels.email), which carry its metadata.
        target["application"] = payload["application"] = request.application
        payload["metadata"] = request.metadata
    recipients = len(request.to) + len(request.cc) + len(request.bcc)
    return JobParts(
        payload=payload,
        target=dict(target),
        description=f"email {request.subject!r} to {recipients} recipient(s)",
    )


def _ascii_domain(sender: str) -> str:
    """The sender's domain for the Message-ID, which must be ASCII: as its A-label, as the worker
    writes it in From (IDNA 2008, via email_validator)."""
    try:
        return wire_address(split_mailbox(sender)[1]).rpartition("@")[2]
    except AddressError:
        return "dispatcher.invalid"


@with_config(ConfigDict(extra="forbid"))
class EmailTarget(TypedDict):
    """What GET /v1/jobs/<id> shows as an email's target."""

    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    #: The application its events go to, if it names one.
    application: NotRequired[str]


CHANNEL = Channel(
    name=NAME,
    id_prefix="em_",
    path="emails",
    summary="Send an email",
    request=EmailRequest,
    batch=EmailBatch,
    target=EmailTarget,
    job=job,
    job_timeout=lambda settings: EMAIL_JOB_TIMEOUT,
    rate=lambda settings: settings.smtp_rate,
)
