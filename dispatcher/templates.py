"""Email templates: Jinja2 in its sandbox, rendered once per recipient when the API accepts a send.

Rendering at acceptance, not at delivery: an undefined variable or a sandbox violation can only be
found by rendering with each recipient's own variables, and the API must find every such error
before it enqueues anything (a 422 naming the recipient). Having rendered, it keeps the result: the
job carries the finished message, so workers, retries, rq-dashboard and the job view need nothing
new. docs/benchmarks.md measures a 10,000-recipient batch.

The sandbox stops attribute tricks (`__class__`, `mro`, ...); on top of it, a template gets a budget
of work per request, so that a hostile one cannot hold an API worker: loop iterations (every loop,
also over a string written in the template), `range()` sizes, and the size of what `*` and `**`
build are all counted or bounded.
"""

from __future__ import annotations

import contextvars
import functools
import json
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from jinja2 import StrictUndefined, TemplateError, UndefinedError, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from dispatcher.capped import add_capped
from dispatcher.history import isoformat

#: The parts of an email a template may give.
FIELDS = ("subject", "text", "html")
#: Loop iterations all of one request's renderings may take together.
MAX_ITERATIONS = 250_000
#: Longest string or list `*` may build, and largest number `**` may, in a template.
MAX_PRODUCT = 100_000
#: Most characters one rendered part may have.
MAX_OUTPUT = 1_000_000
_TICK = "dispatcher_loop_tick"


class TemplateProblem(Exception):
    """A template that cannot be used: `field` names its part (subject, text, html)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_ITERATIONS

    def tick(self) -> str:
        self.left -= 1
        if self.left < 0:
            raise SecurityError(f"the template loops more than {MAX_ITERATIONS:,} times in all")
        return ""


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


class _Sandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int | float) and isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError("the template raises a number to too large a power")
            result = left**right
            if isinstance(result, int) and result.bit_length() > 256:
                raise SecurityError("the template builds too large a number")
            return result
        for value, times in ((left, right), (right, left)):
            if isinstance(value, str | list | tuple) and isinstance(times, int) and len(value) * times > MAX_PRODUCT:
                raise SecurityError(f"the template builds a value longer than {MAX_PRODUCT:,}")
        return super().call_binop(context, operator, left, right)


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True)
    env.globals[_TICK] = lambda: _budget.get().tick()
    env.globals["range"] = _range
    return env


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_PRODUCT:
        raise SecurityError(f"range() may give at most {MAX_PRODUCT:,} numbers here")
    return numbers


_TEXT = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@dataclass(frozen=True)
class Compiled:
    """A template's parts, compiled once per request and rendered per recipient."""

    parts: Mapping[str, Any]

    def render(self, variables: Mapping[str, Any]) -> dict[str, str]:
        """Each part rendered with `variables`; TemplateProblem naming the part on any error."""
        rendered = {}
        for field, template in self.parts.items():
            try:
                rendered[field] = _bounded(field, template.generate(**variables))
            except UndefinedError as exc:
                raise TemplateProblem(field, f"undefined variable: {exc.message}") from None
            except SecurityError as exc:
                raise TemplateProblem(field, f"not allowed in a template: {exc}") from None
            except TemplateProblem:
                raise
            except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, RecursionError) as exc:
                raise TemplateProblem(field, f"cannot be rendered: {type(exc).__name__}: {exc}") from None
        return rendered


def _bounded(field: str, chunks: Iterator[str]) -> str:
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise TemplateProblem(field, f"renders to more than {MAX_OUTPUT:,} characters")
        out.append(chunk)
    return "".join(out)


def compile_template(parts: Mapping[str, str | None]) -> Compiled:
    """Compile the given parts (subject and text use plain text, html autoescapes every variable);
    TemplateProblem naming the part on a syntax error."""
    compiled = {}
    for field in FIELDS:
        source = parts.get(field)
        if source is None:
            continue
        env = _HTML if field == "html" else _TEXT
        try:
            tree = env.parse(source)
        except TemplateError as exc:
            raise TemplateProblem(field, f"template syntax error: {exc}") from None
        for loop in tree.find_all(nodes.For):
            # Every iteration of every loop spends from the request's budget.
            loop.body.insert(0, nodes.Output([nodes.Call(nodes.Name(_TICK, "load"), [], [], None, None)]))
        try:
            compiled[field] = env.from_string(tree)
        except TemplateError as exc:
            raise TemplateProblem(field, f"template syntax error: {exc}") from None
    return Compiled(compiled)


class RenderBudget:
    """One request's budget of loop iterations, for every rendering inside the `with`. The outermost
    `with` opens it and inner ones share it: the API opens one per request, so the items of a batch
    that each name a template spend from one budget, not one each."""

    def __enter__(self) -> RenderBudget:
        self._token = None if _budget.get(None) is not None else _budget.set(_Budget())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _budget.reset(self._token)


def compiled_stored(record: Mapping[str, Any]) -> Compiled:
    """A stored template's parts, compiled (once per version of them in this process: the items of a
    batch may name one template thousands of times)."""
    return _compiled(*(record.get(field) for field in FIELDS))


@functools.lru_cache(maxsize=256)
def _compiled(*sources: str | None) -> Compiled:
    return compile_template(dict(zip(FIELDS, sources, strict=True)))


# --- stored templates ------------------------------------------------------------------------

#: Templates one Dispatcher queue may store.
MAX_STORED = 10_000
ID_PREFIX = "tpl_"


class TemplateStore:
    """Stored templates, one Redis hash per Dispatcher queue: id -> JSON of the template and its times."""

    def __init__(self, connection: redis.Redis, key: str) -> None:
        self.connection = connection
        self.key = key

    def get(self, template_id: str) -> dict | None:
        raw = self.connection.hget(self.key, template_id)
        return None if raw is None else json.loads(raw)

    def list(self) -> list[dict]:
        """Every stored template, newest first."""
        records = [json.loads(raw) for raw in self.connection.hvals(self.key)]
        return sorted(records, key=lambda record: (record["created_at"], record["id"]), reverse=True)

    def create(self, parts: Mapping[str, str | None]) -> dict:
        """Store a template (checked first: TemplateProblem naming the part); TemplateStoreFull past MAX_STORED."""
        compile_template(parts)
        now = isoformat(datetime.now(UTC))
        record = {"id": ID_PREFIX + secrets.token_hex(12), **_parts(parts), "created_at": now, "updated_at": now}
        if not add_capped(self.connection, self.key, str(record["id"]), json.dumps(record), MAX_STORED):
            raise TemplateStoreFull(f"at most {MAX_STORED:,} templates may be stored; delete some first")
        return record

    def replace(self, template_id: str, parts: Mapping[str, str | None]) -> dict | None:
        """Replace a stored template's parts (checked first); None when there is no such template."""
        compile_template(parts)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.key)
                    raw = pipe.hget(self.key, template_id)
                    if raw is None:
                        return None
                    record = json.loads(raw) | _parts(parts) | {"updated_at": isoformat(datetime.now(UTC))}
                    pipe.multi()
                    pipe.hset(self.key, template_id, json.dumps(record))
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def delete(self, template_id: str) -> bool:
        return bool(self.connection.hdel(self.key, template_id))


class TemplateStoreFull(Exception):
    """The store holds MAX_STORED templates already."""


def _parts(parts: Mapping[str, str | None]) -> dict[str, str | None]:
    return {field: parts.get(field) for field in FIELDS}
