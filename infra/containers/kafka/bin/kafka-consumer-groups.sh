#!/bin/sh
# Stand-in for Kafka's bin/kafka-consumer-groups.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@"
