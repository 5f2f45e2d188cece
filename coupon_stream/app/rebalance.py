"""What a worker does when its partitions move: the assignment, the revocation, the restore.

Faust calls these from its rebalance: they must return quickly (the consumer sends no
heartbeat meanwhile), and anything left unwritten by the revoked partitions is forgotten,
not finished: their next owner replays it from the committed offset.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import ConsumerStoppedError, KafkaError

from coupon_stream.connectors import engine, restore
from coupon_stream.connectors.engine import TP
from coupon_stream.connectors.restore import ChangelogReader
from coupon_stream.connectors.store import PartitionStore
from coupon_stream.foundation import metrics
from coupon_stream.foundation.health import StallWatch
from coupon_stream.foundation.settings import Settings
from coupon_stream.pipeline.state_stage import StateStage

log = logging.getLogger(__name__)


class Rebalances:
    """The rebalance callbacks of one worker, and the bulk restore of its tables."""

    def __init__(
        self,
        settings: Settings,
        app: engine.App,
        stage: StateStage,
        stalls: StallWatch,
        stores: dict[str, PartitionStore],
        reader: ChangelogReader,
        release: Callable[[list[object]], Awaitable[None]],
        changelog_ends: dict[str, dict[int, int]] | None = None,
    ) -> None:
        self.settings = settings
        self.app = app
        self.stage = stage
        self.stalls = stalls
        self.stores = stores  # by changelog topic
        self.reader = reader
        self.release = release
        # Read before the app starts: the first assignment trusts them (see `bulk_restore`).
        self._changelog_ends_at_start = changelog_ends
        self.by_buyer_topic = settings.by_buyer_topic

    def register(self) -> None:
        engine.on_assigned(self.app, self.assigned)
        engine.on_revoked(self.app, self.revoked)

    async def assigned(self, assigned: set[TP]) -> None:
        mine = sorted(
            f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic == self.by_buyer_topic
        )
        self.stalls.assigned(tp.partition for tp in assigned if tp.topic == self.by_buyer_topic)
        metrics.REBALANCES.inc()
        log.info("assigned %d partitions: %s", len(mine), ", ".join(mine))

    async def revoked(self, revoked: set[TP]) -> None:
        """Forget the revoked partitions' unwritten work: their next owner replays it."""
        await self.release(await self.stage.forget())
        self.stalls.revoked()
        metrics.CONSUMER_LAG.clear()
        log.info("revoked %d partitions", len(revoked))

    async def bulk_restore(
        self, changelog: str, newly_assigned: set[TP], generation_id: int
    ) -> None:
        """Catch a table's newly assigned active partitions up in bulk (see `restore`).

        Only a speed-up: on any Kafka error Faust's own recovery reads what is left. A
        shutdown stops the reader under it (a SIGTERM during a rebalance): that ends the
        catch-up, it must not crash the worker on its way out.
        """
        store = self.stores[changelog]
        actives = engine.active_partitions(self.app, changelog)
        partitions = sorted(
            tp.partition
            for tp in newly_assigned
            if tp.topic == changelog and tp.partition in actives and store.is_open(tp.partition)
        )
        # Only the first assignment may trust them: the ends only grow, so a stale hint can
        # only make it leave a restore to Faust's recovery, never skip a record.
        hints = self._changelog_ends_at_start or {}
        hint = hints.pop(changelog, None)
        if not partitions or not self.settings.bulk_restore_seconds:
            return
        try:
            await restore.catch_up(
                self.reader,
                store,
                changelog,
                partitions,
                budget=self.settings.bulk_restore_seconds,
                still_current=lambda: engine.generation(self.app) == generation_id,
                ends_hint=hint,
            )
        except (KafkaError, OSError) as exc:
            log.warning("bulk restore stopped, Faust's recovery reads the rest: %r", exc)
        except ConsumerStoppedError:
            log.info("bulk restore stopped: the worker is shutting down")
