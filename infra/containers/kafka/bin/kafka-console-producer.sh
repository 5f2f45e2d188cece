#!/bin/sh
# Stand-in for Kafka's bin/kafka-console-producer.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.ConsoleProducer "$@"
