#!/bin/sh
# Stand-in for Kafka's bin/kafka-broker-api-versions.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.BrokerApiVersionsCommand "$@"
