"""A state table's local partitions, read and written a batch at a time (RocksDB:
`engine.RocksStore`).

Faust owns the tables: it creates the changelog topics, assigns partitions, restores them
from the changelogs and keeps standby copies. Writing through its per-key API, though, costs
a RocksDB put, a changelog send and an offset put per key. The checkpoint instead writes
each changed key once, with one RocksDB WriteBatch per partition plus changelog record
batches, in the same format Faust restores from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol


class PartitionStore(Protocol):
    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def write(self, partition: int, items: Mapping[bytes, bytes | None]) -> None: ...

    def items(self, partition: int, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]: ...

    def persist_offset(self, partition: int, offset: int) -> None: ...

    def persisted_offset(self, partition: int) -> int | None: ...

    def is_open(self, partition: int) -> bool: ...


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
