"""A settings module for RQ's own command line: `rq worker -c workers.rqconfig ...` formats every line,
RQ's and Dispatcher's, as DISPATCHER_LOG_FORMAT says (dispatcher.logs): a JSON object by default.

RQ applies DICT_CONFIG before it sets up its loggers, and adds no handler of its own where one is in
effect. (Add `--disable-job-desc-logging`: RQ's worker logs each job's description, which names the
webhook's URL or the email's subject; Dispatcher's own worker never does.)
"""

from __future__ import annotations

import os

from dispatcher.config import DEFAULT_REDIS_URL, parse_log_format
from dispatcher.connection import rq_cli_settings

DICT_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "dispatcher": {
            "()": "dispatcher.logs.formatter",
            "log_format": parse_log_format(os.environ.get("DISPATCHER_LOG_FORMAT", "").strip() or None),
        }
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "dispatcher"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
}

# Where RQ's CLI finds Redis with `-c workers.rqconfig`: REDIS_URL, a Sentinel URL included
# (RQ reads Sentinel from a settings module only). An explicit `-u` still wins.
globals().update(rq_cli_settings(os.environ.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL))
