"""The web process's watch on delivery: a warning in its log when jobs wait in a queue that no live
worker serves (all workers stopped, or none started for a priority). `dispatcher dev` shows the web
process's log, so it warns there too."""

from __future__ import annotations

import logging
import threading
import time

import redis

from dispatcher.config import Settings
from dispatcher.connection import connect
from dispatcher.enqueue import make_queues
from dispatcher.keys import Keys
from dispatcher.status import StatusReader

log = logging.getLogger("dispatcher.watch")

#: How often the web process looks (a killed worker stops counting as alive within ~10 s).
CHECK_INTERVAL = 5.0
#: A warning that persists is logged again this often.
REPEAT_INTERVAL = 300.0


class DeliveryWatch:
    def __init__(self, settings: Settings, interval: float = CHECK_INTERVAL) -> None:
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        #: Each queue warned about, and when (monotonic).
        self._logged: dict[str, float] = {}

    def start(self) -> None:
        threading.Thread(target=self._run, name="dispatcher-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        connection = connect(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        reader = StatusReader(connection, make_queues(connection, self.settings), Keys(self.settings.queue_name))
        while not self._stop.wait(self.interval):
            try:
                self.check(reader)
            except redis.RedisError:
                pass  # the API's own answers (503) say so; nothing to add here
            except Exception:
                log.exception("the delivery watch failed; trying again")

    def check(self, reader: StatusReader) -> dict[str, int]:
        """Log a warning for each queue whose jobs wait for no live worker when it first does (and
        every REPEAT_INTERVAL while it lasts), and a line when it no longer does; return those
        queues with their waiting jobs."""
        stalled = {
            info["queue"]: info["queued"]
            for info in reader.readiness()["queues"].values()
            if info["queued"] and not info["workers"]
        }
        now = time.monotonic()
        for queue, queued in stalled.items():
            last = self._logged.get(queue)
            if last is None or now - last >= REPEAT_INTERVAL:
                log.warning(
                    "%d job(s) wait in %s and no worker serving it is alive: start `dispatcher worker` "
                    "(the jobs are kept until one runs)",
                    queued,
                    queue,
                )
                self._logged[queue] = now
        for queue in [q for q in self._logged if q not in stalled]:
            log.info("%s: no job waits without a live worker any more", queue)
            del self._logged[queue]
        return stalled
