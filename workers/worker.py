"""Dispatcher's RQ worker: a SimpleWorker that keeps a liveness key and recovers abandoned jobs."""

from __future__ import annotations

from rq.worker import SimpleWorker

from workers.recovery import Reaper

#: RQ's defaults (420 s TTL, so a ~400 s blocking dequeue, and maintenance every 10 minutes)
#: make an idle worker slow to notice anything; these keep it responsive.
WORKER_TTL = 60
MAINTENANCE_INTERVAL = 60
#: Cap on the wait between reconnection attempts while Redis is away (RQ's default is 60 s).
MAX_CONNECTION_WAIT = 5.0


class DispatcherWorker(SimpleWorker):
    """Runs jobs in its own process, so HTTP pools and the SMTP connection live from job to job.

    Listen on one queue only: RQ then dequeues with BLMOVE into an intermediate list, from
    which a job popped by a worker that dies at once can be recovered (with several queues RQ
    uses BLPOP, and such a job would be lost).
    """

    max_connection_wait_time = MAX_CONNECTION_WAIT

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        super().__init__(*args, **kwargs)
        if len(self.queues) != 1:
            raise ValueError(f"a DispatcherWorker listens on exactly one queue, got {len(self.queues)}")
        self.reaper = Reaper(self.connection, self.queues[0], self.name)
        self.stop_requested_by_signal = False

    def bootstrap(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().bootstrap(*args, **kwargs)
        self.reaper.start()

    def teardown(self) -> None:
        self.reaper.stop()
        super().teardown()

    def request_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        self.stop_requested_by_signal = True
        super().request_stop(signum, frame)
