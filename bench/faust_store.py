"""The little of Faust's RocksDB store that `engine.RocksStore` reads, for the benches that
run the state stage or the checkpoint without a Faust app (`bench.apply_micro`,
`bench.checkpoint_micro`): one database per partition, opened with the worker's options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faust.stores.rocksdb import RocksDBOptions

from coupon_stream.connectors.engine import LookupTunedOptions


class FaustStore:
    offset_key = b"__faust\x00offset__"

    def __init__(self, root: Path, partitions: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        options = LookupTunedOptions.like(RocksDBOptions(use_rocksdict=True))
        self._dbs = {p: options.open(root / f"p{p}.db") for p in range(partitions)}

    def _db_for_partition(self, partition: int) -> Any:
        return self._dbs[partition]

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self._dbs[tp.partition][self.offset_key] = str(offset).encode()

    def persisted_offset(self, tp: Any) -> int | None:
        raw = self._dbs[tp.partition].get(self.offset_key)
        return None if raw is None else int(raw)

    def close(self) -> None:
        for db in self._dbs.values():
            db.close()
