"""The RocksDB store on a real rocksdict database, as Faust's `rocksdb://` store opens it."""

from __future__ import annotations

from rocksdict import Options, Rdict

from coupon_stream.connectors.store import RocksStore
from coupon_stream.core.state import buyer_prefix, entry_key


class FaustLikeStore:
    """What RocksStore uses of Faust's store: its open databases and the offset key."""

    offset_key = b"__faust\x00offset__"

    def __init__(self, path):
        self._dbs = {0: Rdict(str(path), Options(raw_mode=True))}
        self.offsets = {}

    def _db_for_partition(self, partition):
        return self._dbs[partition]

    def set_persisted_offset(self, tp, offset):
        self._dbs[tp.partition][self.offset_key] = str(offset).encode()

    def persisted_offset(self, tp):
        raw = self._dbs[tp.partition].get(self.offset_key)
        return None if raw is None else int(raw)


def test_batches_prefix_scans_and_offsets_on_rocksdb(tmp_path):
    faust = FaustLikeStore(tmp_path / "entries-0.db")
    store = RocksStore(faust, "t-entries-changelog")
    keys = {entry_key(b, f"o{i}", "2"): f"{b}-{i}".encode() for b in (-1, 5, 6) for i in range(3)}
    store.write(0, {**keys, b"~format": b"2"})
    store.write(0, {entry_key(6, "o0", "2"): None})  # a delete in a batch
    assert store.get_many(0, [entry_key(5, "o1", "2"), entry_key(6, "o0", "2")]) == [b"5-1", None]
    scanned = [v for _, v in store.items(0, buyer_prefix(5))]
    assert scanned == [b"5-0", b"5-1", b"5-2"]  # the buyer's entries, in key order, no more
    store.persist_offset(0, 41)
    assert store.persisted_offset(0) == 41
    everything = dict(store.items(0))
    assert FaustLikeStore.offset_key not in everything  # Faust's own key is not state
    assert len(everything) == 8 + 1
    faust._dbs[0].close()


def test_state_tables_open_rocksdb_with_whole_key_filters(tmp_path):
    """The worker's tables keep Faust's sizes and add the filters for absent keys."""
    import faust

    from coupon_stream.app import StateTable
    from coupon_stream.connectors.store import LookupTunedOptions

    app = faust.App("store-test", store="rocksdb://", datadir=str(tmp_path), Table=StateTable)
    table = app.Table(
        "entries", options={"driver": "rocksdict", "write_buffer_size": 4 * 1024 * 1024}
    )
    store = table.data
    assert isinstance(store.rocksdb_options, LookupTunedOptions)
    db = store.rocksdb_options.open(tmp_path / "p0.db")
    db[b"k"] = b"v"
    assert db[b"k"] == b"v"
    db.close()
    written = "\n".join(p.read_text() for p in (tmp_path / "p0.db").glob("OPTIONS-*"))
    settings = {line.strip() for line in written.splitlines()}
    assert "write_buffer_size=4194304" in settings  # Faust's options carried over
    assert "memtable_whole_key_filtering=true" in settings
    assert "whole_key_filtering=true" in settings
    assert "memtable_prefix_bloom_size_ratio=0.100000" in settings
