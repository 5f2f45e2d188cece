#!/bin/sh
# Stand-in for Kafka's bin/kafka-run-class.sh: java with libs/ on the classpath, then the
# class and its arguments. KAFKA_HEAP_OPTS, KAFKA_OPTS and KAFKA_LOG4J_OPTS as in Kafka's.
base="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC2086 # the *_OPTS are word lists
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} ${KAFKA_OPTS:-} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:${base}/config/tools-log4j.properties} \
  -cp "${base}/libs/*" "$@"
