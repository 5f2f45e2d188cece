#!/bin/sh
# Stand-in for Kafka's bin/kafka-topics.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.TopicCommand "$@"
