#!/bin/sh
# Stand-in for Kafka's bin/kafka-server-start.sh: the broker with server.properties "$1".
base="$(cd "$(dirname "$0")/.." && pwd)"
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
export KAFKA_LOG4J_OPTS="${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:${base}/config/log4j.properties}"
exec "$(dirname "$0")/kafka-run-class.sh" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
  -XX:InitiatingHeapOccupancyPercent=35 -Djava.awt.headless=true kafka.Kafka "$@"
