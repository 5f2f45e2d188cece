"""Kafka and RocksDB, read and written a batch at a time."""
