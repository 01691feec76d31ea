"""A settings module for RQ's own command line: `rq worker -c workers.rqconfig ...` formats every line,
RQ's and Dispatcher's, as DISPATCHER_LOG_FORMAT says (dispatcher.logs): a JSON object by default.

RQ applies DICT_CONFIG before it sets up its loggers, and adds no handler of its own where one is in
effect. (Add `--disable-job-desc-logging`: RQ's worker logs each job's description, which names the
webhook's URL or the email's subject; Dispatcher's own worker never does.)
"""

from __future__ import annotations

import os

from dispatcher.config import parse_log_format

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
