"""A state table's local partitions, read and written a batch at a time.

Faust owns the tables: it creates the changelog topics, assigns partitions, restores them
from the changelogs and keeps standby copies. Writing through its per-key API, though, costs
a RocksDB put, a changelog send and an offset put per key. The checkpoint instead writes
each changed key once, with one RocksDB WriteBatch per partition plus changelog record
batches, in the same format Faust restores from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import rocksdict
from faust.stores.rocksdb import RocksDBOptions
from faust.types import TP
from rocksdict import WriteBatch

# Bits a key of each SST file's whole-key filter; and the share of a memtable's size
# given to a filter over its keys.
FILTER_BITS_PER_KEY = 10
MEMTABLE_FILTER_RATIO = 0.1


class LookupTunedOptions(RocksDBOptions):
    """Faust's RocksDB options, with filters for what the state stage asks most: absent keys.

    Nearly every record looks up an entry that does not exist yet. Faust's default filter
    (3 bits a key, one per data block) still reads the index of every file for such a key;
    a whole-key filter per file and one over the memtables answer most of them without
    reading a block (docs/performance.md). Files written with the old filter stay readable.
    """

    @classmethod
    def like(cls, options: RocksDBOptions) -> LookupTunedOptions:
        given = {k: v for k, v in vars(options).items() if k != "extra_options"}
        return cls(**given, **options.extra_options)

    def as_options(self) -> Any:
        options = super().as_options()
        if self.use_rocksdict:
            table = rocksdict.BlockBasedOptions()
            table.set_bloom_filter(FILTER_BITS_PER_KEY, block_based=False)
            table.set_block_cache(rocksdict.Cache(self.block_cache_size))
            table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
            options.set_block_based_table_factory(table)
            options.set_memtable_prefix_bloom_ratio(MEMTABLE_FILTER_RATIO)
            options.set_memtable_whole_key_filtering(True)
        return options


class PartitionStore(Protocol):
    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def write(self, partition: int, items: Mapping[bytes, bytes | None]) -> None: ...

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]: ...

    def persist_offset(self, partition: int, offset: int) -> None: ...

    def persisted_offset(self, partition: int) -> int | None: ...

    def is_open(self, partition: int) -> bool: ...


class RocksStore:
    """The partitions of a Faust `rocksdb://` table store (rocksdict driver)."""

    def __init__(self, faust_store: Any, changelog_topic: str) -> None:
        self._store = faust_store
        self._changelog_topic = changelog_topic

    def _db(self, partition: int) -> Any:
        return self._store._db_for_partition(partition)

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = self._db(partition).get(list(keys))
        return values

    def write(self, partition: int, items: Mapping[bytes, bytes | None]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in items.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self._db(partition).write(batch)

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Keys in order, from `prefix` on while they start with it (Faust's own key left out)."""
        offset_key = self._store.offset_key
        for key, value in self._db(partition).items(from_key=prefix or None):
            if not key.startswith(prefix):
                return
            if key != offset_key:
                yield key, value

    def persist_offset(self, partition: int, offset: int) -> None:
        """Remember the changelog offset the local copy holds, so a restart reads only past it.

        Skipped once the partition has moved away (Faust closed its database).
        """
        if self.is_open(partition):
            self._store.set_persisted_offset(TP(self._changelog_topic, partition), offset)

    def persisted_offset(self, partition: int) -> int | None:
        offset: int | None = self._store.persisted_offset(TP(self._changelog_topic, partition))
        return offset

    def is_open(self, partition: int) -> bool:
        """Whether Faust opened this partition's database for this worker (active copies)."""
        return partition in self._store._dbs


class MemoryStore:
    """Partitions as dicts: for `memory://` tables (unit tests, throwaway runs)."""

    def __init__(self) -> None:
        self.partitions: dict[int, dict[bytes, bytes]] = {}
        self.offsets: dict[int, int] = {}

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        data = self.partitions.get(partition, {})
        return [data.get(k) for k in keys]

    def write(self, partition: int, items: Mapping[bytes, bytes | None]) -> None:
        data = self.partitions.setdefault(partition, {})
        for key, value in items.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        data = self.partitions.get(partition, {})
        yield from sorted((k, v) for k, v in data.items() if k.startswith(prefix))

    def persist_offset(self, partition: int, offset: int) -> None:
        self.offsets[partition] = max(offset, self.offsets.get(partition, -1))

    def persisted_offset(self, partition: int) -> int | None:
        return self.offsets.get(partition)

    def is_open(self, partition: int) -> bool:
        return True
