#!/bin/sh
# Stand-in for Kafka's bin/kafka-storage.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
