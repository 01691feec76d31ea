"""What every `dispatcher` command shares: the command group, its failures (one line each, with
the exit code), the configuration errors, and the attempt line the job views print."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import click
import redis

from dispatcher.config import Settings
from dispatcher.errors import ConfigError

#: How often `status --watch` reads the job again.
WATCH_INTERVAL = 0.5
TERMINAL = ("succeeded", "failed", "canceled")

F = TypeVar("F", bound=Callable[..., Any])


class Failed(click.ClickException):
    """The command could not do its work: one line, exit code 1."""

    exit_code = 1


class Misconfigured(click.ClickException):
    """Configuration (environment) unusable: one line, exit code 2."""

    exit_code = 2


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line; every failure is one line `dispatcher <command>: ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="dispatcher", standalone_mode=False)
    except click.ClickException as exc:
        name = next((arg for arg in args if arg in cli.commands), None)
        message = exc.format_message()
        if isinstance(exc, click.UsageError):
            help_command = f"dispatcher {name} --help" if name else "dispatcher --help"
            message = f"{message.rstrip('.')} (see {help_command})"
        click.echo(f"dispatcher{' ' + name if name else ''}: {message}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except redis.RedisError as exc:  # Redis went away while a command was reading it
        name = next((arg for arg in args if arg in cli.commands), None)
        click.echo(f"dispatcher {name}: Redis failed: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Dispatcher: send email and call webhooks in the background, with retries, on RQ and Redis.

    Quick start: `dispatcher dev` runs everything here (embedded Redis, the API, a worker). From
    the same directory, the other commands then find that service through ./var/ by themselves.
    Elsewhere they read REDIS_URL (status, jobs, retry, cancel, replay, stats, rq-info) or DISPATCHER_URL and
    DISPATCHER_API_KEY (send-email, send-webhook).
    """


@contextlib.contextmanager
def configuration() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise Misconfigured(str(exc)) from None


def exit_with(code: int) -> NoReturn:
    raise click.exceptions.Exit(code)


def load_settings() -> Settings:
    with configuration():
        return Settings.from_env()


def attempt_line(attempt: dict) -> str:
    duration = f"{attempt['duration_ms']} ms" if attempt.get("duration_ms") is not None else "running"
    code = attempt.get("status_code")
    parts = [f"  attempt {attempt['number']}", attempt.get("finished_at") or attempt["started_at"]]
    parts += [attempt.get("outcome") or "running", str(code) if code is not None else "-", duration]
    if attempt.get("error"):
        parts.append(attempt["error"])
    return "  ".join(parts)
