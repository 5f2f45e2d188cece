"""What a worker does when its partitions move: the assignment, the revocation, the restore.

Faust calls the callbacks from its rebalance, where the consumer sends no heartbeat: they
return at once. Anything left unwritten by revoked partitions is forgotten, not finished:
their next owner replays it from the committed offset. The restore of the tables runs after
the callback, in the background (`Restorer`); Faust's recovery waits for it
(`engine.on_restore`) and keeps every by-buyer partition paused until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from coupon_stream.connectors import engine
from coupon_stream.connectors.engine import TP
from coupon_stream.connectors.faults import Backoff, ConsumerStoppedError, KafkaError, retry
from coupon_stream.connectors.restore import ChangelogReader, Progress, catch_up, measure, read
from coupon_stream.connectors.store import PartitionStore
from coupon_stream.foundation import metrics
from coupon_stream.foundation.settings import Settings
from coupon_stream.foundation.stalls import StallWatch
from coupon_stream.pipeline.state_stage import StateStage

log = logging.getLogger(__name__)

# How often a standby copy reads what its changelog gained: its lag behind the active.
MIRROR_SECONDS = 1.0


class Restorer:
    """Reads assigned table partitions' changelogs in bulk, in a background task.

    On each assignment the task restores the active copies to their changelogs' ends (the
    by-buyer partitions wait for it), then mirrors the standby copies for as long as the
    assignment lasts: Faust's consumer never fetches them. A rebalance cancels it; what it
    wrote stays, with its offsets, and the next restore continues from there.
    """

    def __init__(
        self, stores: dict[str, tuple[str, PartitionStore]], reader: ChangelogReader
    ) -> None:
        self.stores = stores  # changelog topic -> (table, its partitions)
        self.reader = reader
        self.task: asyncio.Task[None] | None = None
        self.progress = Progress("restore")
        self.standby_lag: dict[TP, int] = {}

    def plan(self, actives: set[TP], standbys: set[TP]) -> asyncio.Event:
        """Start restoring; the event is set once the active copies are read (or given up)."""
        restored = asyncio.Event()
        previous = self.task
        self.task = asyncio.ensure_future(self._run(actives, standbys, restored, previous))
        return restored

    async def cancel(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # Its partitions may not be this worker's any more: the lag gauge must not show them
        # again after the revocation cleared it (`Rebalances.revoked`).
        self.progress.clear()
        self.standby_lag.clear()

    async def _run(
        self,
        actives: set[TP],
        standbys: set[TP],
        restored: asyncio.Event,
        previous: asyncio.Task[None] | None,
    ) -> None:
        try:
            if previous is not None and not previous.done():
                previous.cancel()  # it must not write on while this one reads
                await asyncio.gather(previous, return_exceptions=True)
            self.progress.clear()
            self.progress = Progress("restore")
            self.standby_lag.clear()
            await self._restore_actives(actives)
        except ConsumerStoppedError:
            log.info("restore stopped: the worker is shutting down")
            return
        except (KafkaError, OSError) as exc:
            log.warning("bulk restore stopped, Faust's recovery reads the rest: %r", exc)
        finally:
            restored.set()
        if standbys:
            await self._mirror(standbys)

    async def _restore_actives(self, actives: set[TP]) -> None:
        if not actives:
            return
        started = time.monotonic()
        progress = self.progress
        by_topic = self._by_topic(actives)
        parts = {}  # every range first: progress and readiness show the whole restore
        for topic, partitions in by_topic.items():
            table, store = self.stores[topic]
            parts[topic] = await measure(self.reader, store, table, topic, partitions, progress)
        log.info(
            "restoring %d changelog records into %d active partitions: %s",
            progress.left(),
            len(actives),
            ", ".join(
                f"{p.table}[{p.partition}] {p.left}" for ps in parts.values() for p in ps.values()
            ),
        )
        for topic, topic_parts in parts.items():
            await read(self.reader, self.stores[topic][1], topic, topic_parts, progress)
        elapsed = time.monotonic() - started
        log.info(
            "restored %d changelog records into %d active partitions in %.1f s (%.0f records/s)",
            progress.applied,
            len(actives),
            elapsed,
            progress.applied / elapsed if elapsed else 0.0,
        )

    async def _mirror(self, standbys: set[TP]) -> None:
        """Keep the standby copies within about MIRROR_SECONDS of their changelogs.

        An outage is waited out (the one `retry`: a warning per attempt, the attempts
        backing off to one a minute); an error that cannot go away (a refused read) ends the
        mirror, loudly: the copies then stay as they are, and a takeover restores the rest.
        """
        log.info("mirroring %d standby partitions in bulk", len(standbys))
        by_topic = self._by_topic(standbys)

        def failed(exc: BaseException, delay: float) -> None:
            log.warning("standby mirror could not read, again in %.0f s: %r", delay, exc)

        while True:
            try:
                await retry(
                    lambda: self._catch_up_standbys(by_topic),
                    backoff=Backoff(MIRROR_SECONDS, 60.0),
                    failed=failed,
                )
            except ConsumerStoppedError:
                return  # the worker is stopping
            except Exception as exc:  # noqa: BLE001 - permanent: `retry` classified it
                log.error("standby mirror stopped, the copies are no longer kept current: %r", exc)
                return
            await asyncio.sleep(MIRROR_SECONDS)

    async def _catch_up_standbys(self, by_topic: dict[str, list[int]]) -> None:
        for topic, partitions in by_topic.items():
            table, store = self.stores[topic]
            progress = Progress("standby catch-up", export=False)
            parts = await catch_up(self.reader, store, table, topic, partitions, progress)
            for p, part in parts.items():
                self.standby_lag[TP(topic, p)] = part.left

    def _by_topic(self, tps: set[TP]) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = defaultdict(list)
        for tp in tps:
            if tp.topic in self.stores:
                grouped[tp.topic].append(tp.partition)
        return grouped


class Rebalances:
    """The rebalance callbacks of one worker."""

    def __init__(
        self,
        settings: Settings,
        app: engine.App,
        stage: StateStage,
        stalls: StallWatch,
        restorer: Restorer,
        release: Callable[[list[object]], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.app = app
        self.stage = stage
        self.stalls = stalls
        self.restorer = restorer
        self.release = release
        self.by_buyer_topic = settings.by_buyer_topic

    def register(self) -> None:
        engine.on_assigned(self.app, self.assigned)
        engine.on_revoked(self.app, self.revoked)
        engine.on_restore(self.app, self.restorer.plan)

    async def assigned(self, assigned: set[TP]) -> None:
        mine = sorted(
            f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic == self.by_buyer_topic
        )
        self.stalls.assigned(tp.partition for tp in assigned if tp.topic == self.by_buyer_topic)
        metrics.REBALANCES.inc()
        log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

    async def revoked(self, revoked: set[TP]) -> None:
        """Forget the revoked partitions' unwritten work: their next owner replays it."""
        await self.restorer.cancel()  # before Faust closes the revoked partitions' stores
        await self.release(await self.stage.forget())
        self.stalls.revoked()
        metrics.CONSUMER_LAG.clear()
        log.info("revoked %d partitions", len(revoked))
