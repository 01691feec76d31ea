"""Settings from the environment: what is rejected (naming the variable), what is parsed, and the CLI's one line."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from dispatcher.config import RetrySchedule, Settings, SmtpSettings
from dispatcher.errors import ConfigError
from tests.conftest import ROOT, WEBHOOK_SECRET, process_env


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("DISPATCHER_SMTP_URL", "http://mail.example.com", id="smtp-http-scheme"),
        pytest.param("DISPATCHER_SMTP_URL", "mail.example.com:25", id="smtp-no-scheme"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://", id="smtp-no-host"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://user:pass@:25", id="smtp-userinfo-no-host"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://mail.example.com:abc", id="smtp-port-abc"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://mail.example.com:99999", id="smtp-port-99999"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://mail.example.com:0", id="smtp-port-0"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://mail.example.com?tls=true", id="smtp-unknown-option"),
        pytest.param("DISPATCHER_SMTP_URL", "smtp://mail.example.com?starttls=maybe", id="smtp-starttls-maybe"),
        pytest.param("DISPATCHER_SMTP_URL", "smtps://mail.example.com?starttls=true", id="smtps-with-starttls"),
        pytest.param("DISPATCHER_WEBHOOK_SECRET", base64.b64encode(b"x" * 32).decode(), id="secret-no-prefix"),
        pytest.param("DISPATCHER_WEBHOOK_SECRET", "whsec_not*base64!", id="secret-not-base64"),
        pytest.param("DISPATCHER_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"x" * 15).decode(), id="secret-short"),
        # The Standard Webhooks spec: 24 to 64 bytes.
        pytest.param(
            "DISPATCHER_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"x" * 16).decode(), id="secret-16-bytes"
        ),
        pytest.param(
            "DISPATCHER_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"x" * 23).decode(), id="secret-23-bytes"
        ),
        pytest.param(
            "DISPATCHER_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"x" * 65).decode(), id="secret-65-bytes"
        ),
        pytest.param("REDIS_URL", "http://127.0.0.1:6379", id="redis-http-scheme"),
        pytest.param("REDIS_URL", "127.0.0.1:6379", id="redis-no-scheme"),
        pytest.param("REDIS_URL", "redis://127.0.0.1:99999/0", id="redis-port-99999"),
        pytest.param("REDIS_URL", "redis://127.0.0.1:6379/zero", id="redis-db-not-a-number"),
        pytest.param("DISPATCHER_MAX_PER_HOST", "0", id="max-per-host-0"),
        pytest.param("DISPATCHER_SMTP_TIMEOUT", "0", id="smtp-timeout-0"),
        pytest.param("DISPATCHER_DNS_TIMEOUT", "abc", id="dns-timeout-abc"),
        pytest.param("DISPATCHER_HOST", "localhost", id="host-not-an-address"),
        pytest.param("DISPATCHER_ALLOWED_NETWORKS", "localhost", id="networks-hostname"),
        pytest.param("DISPATCHER_ALLOWED_NETWORKS", "127.0.0.0/8,10.0.0.0/33", id="networks-bad-prefix"),
        pytest.param("DISPATCHER_WEBHOOK_TIMEOUT", "abc", id="timeout-abc"),
        pytest.param("DISPATCHER_WEBHOOK_TIMEOUT", "0", id="timeout-0"),
        pytest.param("DISPATCHER_WEBHOOK_TIMEOUT", "nan", id="timeout-nan"),
        pytest.param("PORT", "0", id="port-0"),
        pytest.param("PORT", "abc", id="port-abc"),
        pytest.param("PORT", "65536", id="port-65536"),
        pytest.param("DISPATCHER_WEBHOOK_MAX_ATTEMPTS", "0", id="webhook-attempts-0"),
        pytest.param("DISPATCHER_WEBHOOK_MAX_ATTEMPTS", "21", id="webhook-attempts-21"),
        pytest.param("DISPATCHER_EMAIL_MAX_ATTEMPTS", "many", id="email-attempts-many"),
        pytest.param("DISPATCHER_EMAIL_BACKOFF", "abc", id="email-backoff-abc"),
        pytest.param("DISPATCHER_EMAIL_BACKOFF", "60,-1", id="email-backoff-negative"),
        pytest.param("DISPATCHER_WEBHOOK_BACKOFF", "5,nan", id="webhook-backoff-nan"),
        pytest.param("DISPATCHER_WEBHOOK_BACKOFF", "5,99999999", id="webhook-backoff-over-7-days"),
        pytest.param("DISPATCHER_EMAIL_FROM", "not an address", id="email-from-invalid"),
        pytest.param("DISPATCHER_EMAIL_FROM", "Sender <sender@>", id="email-from-no-domain"),
        pytest.param("DISPATCHER_QUEUE", "my queue", id="queue-with-space"),
        pytest.param("DISPATCHER_QUEUE", "a:b", id="queue-with-colon"),
        pytest.param("DISPATCHER_RETENTION_SUCCEEDED", "0", id="retention-succeeded-zero"),
        pytest.param("DISPATCHER_RETENTION_FAILED", "2d", id="retention-failed-not-seconds"),
        pytest.param("DISPATCHER_RESULT_TTL", "0", id="old-name-zero"),
        pytest.param("DISPATCHER_SMTP_RATE", "fast", id="smtp-rate-word"),
        pytest.param("DISPATCHER_SMTP_RATE", "0", id="smtp-rate-0"),
        pytest.param("DISPATCHER_SMTP_RATE", "-5", id="smtp-rate-negative"),
        pytest.param("DISPATCHER_SMTP_RATE", "nan", id="smtp-rate-nan"),
        pytest.param("DISPATCHER_SMTP_RATE", "inf", id="smtp-rate-inf"),
    ],
)
def test_bad_value_is_a_config_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({name: value})

    assert name in str(raised.value)


def test_smtp_url_with_credentials_and_starttls():
    settings = Settings.from_env(
        {"DISPATCHER_SMTP_URL": "smtp://mailer%40example.com:p%3As%2Fs@mail.example.com:587?starttls=true"}
    )

    assert settings.smtp == SmtpSettings(
        host="mail.example.com",
        port=587,
        username="mailer@example.com",
        password="p:s/s",
        ssl=False,
        starttls=True,
    )


def test_smtp_password_is_not_in_repr():
    settings = Settings.from_env({"DISPATCHER_SMTP_URL": "smtp://user:hunter2secret@mail.example.com"})

    assert settings.smtp is not None and settings.smtp.password == "hunter2secret"
    assert "hunter2secret" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "port", "ssl"),
    [
        ("smtps://mail.example.com", 465, True),
        ("smtp://mail.example.com", 25, False),
        ("smtps://mail.example.com:2465", 2465, True),
    ],
)
def test_smtp_default_ports(url, port, ssl):
    smtp = Settings.from_env({"DISPATCHER_SMTP_URL": url}).smtp

    assert smtp is not None
    assert (smtp.port, smtp.ssl, smtp.starttls, smtp.username, smtp.password) == (port, ssl, False, None, None)


def test_backoff_lists_and_attempts_are_parsed():
    settings = Settings.from_env(
        {
            "DISPATCHER_WEBHOOK_BACKOFF": "1, 2.5 ,30",
            "DISPATCHER_WEBHOOK_MAX_ATTEMPTS": "4",
            "DISPATCHER_EMAIL_BACKOFF": "10",
            "DISPATCHER_EMAIL_MAX_ATTEMPTS": "20",
        }
    )

    assert settings.webhook_retry == RetrySchedule(4, (1.0, 2.5, 30.0))
    assert settings.email_retry == RetrySchedule(20, (10.0,))


def test_defaults():
    settings = Settings.from_env({})

    assert settings.webhook_retry == RetrySchedule(8, (5, 300, 1800, 7200, 18000, 36000, 36000))
    assert settings.email_retry == RetrySchedule(6, (60, 300, 1800, 7200, 21600))
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.queue_name == "dispatcher"
    assert settings.port == 8000
    assert settings.api_keys == ()
    assert settings.email_from is None
    assert settings.smtp is None
    assert settings.webhook_secret is None
    assert settings.webhook_timeout == 15.0
    assert settings.allowed_networks == ()


def test_other_values_are_parsed():
    settings = Settings.from_env(
        {
            "DISPATCHER_API_KEYS": " key-one , key-two,, ",
            "DISPATCHER_ALLOWED_NETWORKS": "127.0.0.0/8, ::1/128, 10.1.2.3/8",
            "DISPATCHER_WEBHOOK_TIMEOUT": "2.5",
            "DISPATCHER_QUEUE": "tenant-a.mail_1",
            "DISPATCHER_EMAIL_FROM": "Shop <shop@example.com>",
            "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PORT": "8080",
            "DISPATCHER_SMTP_RATE": "12.5",
        }
    )

    assert settings.api_keys == ("key-one", "key-two")
    assert [str(n) for n in settings.allowed_networks] == ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]
    assert settings.webhook_timeout == 2.5
    assert settings.queue_name == "tenant-a.mail_1"
    assert settings.email_from == "Shop <shop@example.com>"
    assert settings.require_webhook_secret() == WEBHOOK_SECRET
    assert settings.port == 8080
    assert settings.smtp_rate == 12.5


@pytest.mark.parametrize("size", [24, 32, 64])
def test_signing_secrets_of_24_to_64_bytes_are_accepted(size):
    secret = "whsec_" + base64.b64encode(b"k" * size).decode()

    assert Settings.from_env({"DISPATCHER_WEBHOOK_SECRET": secret}).require_webhook_secret() == secret


def test_max_per_host_defaults_to_a_quarter_of_the_concurrency_and_may_not_exceed_it():
    assert Settings.from_env({"DISPATCHER_CONCURRENCY": "32"}).max_per_host == 8
    assert Settings.from_env({"DISPATCHER_CONCURRENCY": "2"}).max_per_host == 1
    with pytest.raises(ConfigError, match="DISPATCHER_MAX_PER_HOST"):
        Settings.from_env({"DISPATCHER_CONCURRENCY": "8", "DISPATCHER_MAX_PER_HOST": "9"})


def test_blank_values_mean_the_default():
    settings = Settings.from_env({"PORT": "  ", "DISPATCHER_QUEUE": "", "DISPATCHER_WEBHOOK_MAX_ATTEMPTS": " "})

    assert (settings.port, settings.queue_name, settings.webhook_retry.max_attempts) == (8000, "dispatcher", 8)


def test_missing_api_keys_and_secret_are_config_errors():
    settings = Settings.from_env({})

    with pytest.raises(ConfigError, match="DISPATCHER_API_KEYS"):
        settings.require_api_keys()
    with pytest.raises(ConfigError, match="DISPATCHER_WEBHOOK_SECRET"):
        settings.require_webhook_secret()


# --- The CLI ---------------------------------------------------------------------------------


def run_cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", command],
        env=process_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_naming(result: subprocess.CompletedProcess, command: str, variable: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dispatcher {command}: ")
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_web_without_api_keys_exits_2_with_one_line(redis_url):
    result = run_cli("web", {"REDIS_URL": redis_url, "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET})

    assert_one_line_naming(result, "web", "DISPATCHER_API_KEYS")


def test_worker_without_webhook_secret_exits_2_with_one_line(redis_url):
    result = run_cli("worker", {"REDIS_URL": redis_url, "DISPATCHER_API_KEYS": "key"})

    assert_one_line_naming(result, "worker", "DISPATCHER_WEBHOOK_SECRET")


@pytest.mark.parametrize("command", ["web", "worker"])
def test_invalid_smtp_url_exits_2_with_one_line(redis_url, command):
    env = {
        "REDIS_URL": redis_url,
        "DISPATCHER_API_KEYS": "key",
        "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DISPATCHER_SMTP_URL": "smtps://mail.example.com?starttls=true",
    }

    result = run_cli(command, env)

    assert_one_line_naming(result, command, "DISPATCHER_SMTP_URL")


@pytest.mark.parametrize("command", ["web", "worker", "dev"])
def test_a_short_signing_secret_stops_start_up_with_one_line(redis_url, command):
    env = {
        "REDIS_URL": redis_url,
        "DISPATCHER_API_KEYS": "key",
        "DISPATCHER_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"s" * 16).decode(),
    }

    result = run_cli(command, env)

    assert_one_line_naming(result, command, "DISPATCHER_WEBHOOK_SECRET")
    assert "24-64 bytes" in result.stderr


@pytest.mark.parametrize("command", ["web", "worker", "dev"])
def test_a_bad_redis_url_stops_start_up_with_one_line(command):
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/zero",
        "DISPATCHER_API_KEYS": "key",
        "DISPATCHER_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }

    result = run_cli(command, env)

    assert_one_line_naming(result, command, "REDIS_URL")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (7 * 24 * 3600, 30 * 24 * 3600)),
        ({"DISPATCHER_RETENTION_SUCCEEDED": "60", "DISPATCHER_RETENTION_FAILED": "120"}, (60, 120)),
        ({"DISPATCHER_RESULT_TTL": "61", "DISPATCHER_FAILURE_TTL": "121"}, (61, 121)),  # the names before
        ({"DISPATCHER_RETENTION_FAILED": "5", "DISPATCHER_FAILURE_TTL": "5"}, (7 * 24 * 3600, 5)),
    ],
)
def test_retention_is_read_under_its_name_or_its_old_one(env, expected):
    settings = Settings.from_env(env)
    assert (settings.result_ttl, settings.failure_ttl) == expected


def test_retention_under_both_names_with_different_values_is_refused():
    with pytest.raises(ConfigError, match="DISPATCHER_RETENTION_FAILED and DISPATCHER_FAILURE_TTL"):
        Settings.from_env({"DISPATCHER_RETENTION_FAILED": "5", "DISPATCHER_FAILURE_TTL": "6"})
