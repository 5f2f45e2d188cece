#!/bin/sh
# Stand-in for Kafka's bin/kafka-console-consumer.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.consumer.ConsoleConsumer "$@"
