"""One worker thread runs the model; requests are grouped by setting.

The worker takes the oldest waiting job, then every other waiting job with the same
setting (up to ``max_group`` sequences), sets the weights once and runs the group.
Since nothing else touches the model, a request can only ever run under its own
setting, however many requests with other settings are in flight; grouping is what
keeps the cost of switching small when settings are mixed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional

from meav_merge.serving.engine import Engine, Result, Sequence_
from meav_merge.serving.settings import Setting

logger = logging.getLogger(__name__)


@dataclass
class Job:
    setting: Setting
    seqs: List[Sequence_]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, engine: Engine, max_group: int = 64):
        self.engine = engine
        self.max_group = max_group
        self._queue: Deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.groups = 0
        self._thread = threading.Thread(target=self._loop, name="meav-serve-worker", daemon=True)
        self._thread.start()

    async def submit(self, setting: Setting, seqs: List[Sequence_]) -> List[Result]:
        loop = asyncio.get_running_loop()
        job = Job(setting, seqs, loop, loop.create_future())
        with self._cv:
            if self._stopping:
                raise RuntimeError("server is shutting down")
            self._queue.append(job)
            self._cv.notify()
        return await job.future

    def _take_group(self) -> Optional[List[Job]]:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            group, size = [first], len(first.seqs)
            for job in list(self._queue):
                if job.setting == first.setting and size + len(job.seqs) <= self.max_group:
                    self._queue.remove(job)
                    group.append(job)
                    size += len(job.seqs)
            return group

    def _loop(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            self.groups += 1
            try:
                self.engine.set_setting(group[0].setting)
                results = self.engine.run([s for job in group for s in job.seqs])
            except Exception as e:  # a failed batch fails its requests, not the server
                logger.exception("batch failed")
                for job in group:
                    job.loop.call_soon_threadsafe(_set_exception, job.future, e)
                continue
            start = 0
            for job in group:
                part = results[start : start + len(job.seqs)]
                start += len(job.seqs)
                job.loop.call_soon_threadsafe(_set_result, job.future, part)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
