#!/usr/bin/env bash
# kafka-run-class.sh [-name NAME] [-daemon] CLASS [ARGS...]: runs a class from /opt/kafka/libs,
# with the environment Kafka's own script reads: KAFKA_HEAP_OPTS (default -Xmx256M),
# KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_LOG4J_OPTS (default: the tools' config, WARN to stderr),
# KAFKA_OPTS, JAVA_HOME. -name is accepted and ignored; -daemon is refused (a container runs
# its process in the foreground).
set -euo pipefail
base="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
if [[ ${1:-} == -name ]]; then
  shift 2
fi
if [[ ${1:-} == -daemon ]]; then
  echo "kafka-run-class.sh: -daemon is not supported in this image; run in the foreground" >&2
  exit 2
fi
[[ $# -ge 1 ]] || { echo "usage: kafka-run-class.sh [-name NAME] CLASS [ARGS...]" >&2; exit 2; }
java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xmx256M}"
read -r -a perf <<<"${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}"
read -r -a log4j <<<"${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$base/config/tools-log4j2.properties}"
read -r -a opts <<<"${KAFKA_OPTS:-}"
exec "$java" "${heap[@]}" "${perf[@]}" "${log4j[@]}" "${opts[@]}" -cp "$base/libs/*" "$@"
