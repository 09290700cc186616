#!/usr/bin/env bash
# The scripts of Kafka's bin/ this image has (links to this file), each the class Kafka's
# script of that name runs. kafka-server-start.sh CONFIG starts the broker with the server's
# logging (INFO to stdout) and, as Kafka's script, a 1 GB heap unless KAFKA_HEAP_OPTS says
# otherwise.
set -euo pipefail
here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
name="$(basename "$0")"
case "$name" in
  kafka-server-start.sh)
    [[ $# -ge 1 ]] || { echo "usage: kafka-server-start.sh server.properties [--override property=value]*" >&2; exit 2; }
    export KAFKA_LOG4J_OPTS="${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$here/../config/log4j2.properties}"
    export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
    exec "$here/kafka-run-class.sh" -name kafkaServer kafka.Kafka "$@"
    ;;
  kafka-storage.sh) class=kafka.tools.StorageTool ;;
  kafka-topics.sh) class=org.apache.kafka.tools.TopicCommand ;;
  kafka-console-producer.sh) class=org.apache.kafka.tools.ConsoleProducer ;;
  kafka-console-consumer.sh) class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
  kafka-broker-api-versions.sh) class=org.apache.kafka.tools.BrokerApiVersionsCommand ;;
  kafka-transactions.sh) class=org.apache.kafka.tools.TransactionsCommand ;;
  kafka-consumer-groups.sh) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
  kafka-metadata-quorum.sh) class=org.apache.kafka.tools.MetadataQuorumCommand ;;
  kafka-configs.sh) class=kafka.admin.ConfigCommand ;;
  kafka-features.sh) class=org.apache.kafka.tools.FeatureCommand ;;
  *) echo "kafka-tool.sh: unknown tool $name" >&2; exit 2 ;;
esac
exec "$here/kafka-run-class.sh" "$class" "$@"
