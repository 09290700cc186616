#!/usr/bin/env bash
# Start/stop a single-node Apache Kafka (KRaft, combined broker+controller)
# for Pledge's integration tests, from the jars on Maven Central.
#
#   kafka.sh start     fetch jars (cached), format storage once, start, wait until ready
#   kafka.sh stop      SIGTERM the broker, wait (bounded), SIGKILL as a last resort
#   kafka.sh status    exit 0 if our broker is up and accepting connections
#   kafka.sh env       print exports; use: eval "$(kafka.sh env)"
#   kafka.sh tool NAME|MAIN-CLASS [ARGS...]
#                      run a Kafka CLI tool from the same jars, e.g.
#                        kafka.sh tool topics --bootstrap-server 127.0.0.1:59092 --list
#                        kafka.sh tool transactions --bootstrap-server 127.0.0.1:59092 list
#                      NAME is one of: topics console-producer console-consumer
#                        transactions consumer-groups metadata-quorum api-versions configs
#                      (through the SASL_SSL listener: add
#                        --command-config $PLEDGE_STATE_DIR/kafka/client-sasl-ssl.properties)
#
# Listeners, all on 127.0.0.1:
#   PLAINTEXT  $PLEDGE_KAFKA_PORT           no encryption, no authentication (inter-broker too)
#   SSL        $PLEDGE_KAFKA_SSL_PORT       TLS; the client must present a certificate of the test CA
#   SASL_SSL   $PLEDGE_KAFKA_SASL_SSL_PORT  TLS, then SASL SCRAM-SHA-512 or SCRAM-SHA-256 as user
#                                           "pledge" (password generated once, in
#                                           $PLEDGE_STATE_DIR/kafka/scram-password)
# The test CA, the broker's certificate (127.0.0.1 and localhost) and a client certificate are
# made once with openssl in $PLEDGE_STATE_DIR/kafka/tls; `env` exports where they are.
#
# Environment:
#   PLEDGE_STATE_DIR        default /tmp/pledge-it  (broker data/logs in $PLEDGE_STATE_DIR/kafka)
#   PLEDGE_CACHE_DIR        default ~/.cache/pledge (jars in kafka-<version>/libs, reused)
#   PLEDGE_KAFKA_PORT       default 59092  (client listener, 127.0.0.1)
#   PLEDGE_KAFKA_CONTROLLER_PORT  default 59093  (KRaft controller listener, 127.0.0.1)
#   PLEDGE_KAFKA_SSL_PORT   default 59094  (SSL listener, client certificates required)
#   PLEDGE_KAFKA_SASL_SSL_PORT  default 59095  (SASL_SSL listener, SCRAM)
#   PLEDGE_KAFKA_HEAP       default -Xms256m -Xmx512m
#   PLEDGE_KAFKA_EXTRA_PROPS  extra server.properties lines (key=value, newline separated),
#                           e.g. transaction.max.timeout.ms=60000
#   PLEDGE_KAFKA_FEATURES   feature levels for the FIRST format only (space separated),
#                           e.g. "transaction.version=1"; to change later: stop, rm -rf the
#                           state dir's kafka/ folder, start
set -euo pipefail

LOG_TAG=kafka
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# PINNED. 4.3.1 is the newest 4.x for which Maven Central serves the whole set
# we need: kafka_2.13 (broker, StorageTool) AND kafka-tools (TopicCommand,
# console producer/consumer, TransactionsCommand). kafka_2.13:4.4.0 is served,
# but kafka-tools:4.4.0 is not, and mixing 4.4 broker jars with 4.3 tool jars
# on one classpath is asking for NoSuchMethodErrors.
KAFKA_VERSION=4.3.1
# SLF4J binding. Kafka 4.x codes against slf4j-api 1.7.x and ships log4j2
# (kafka-tools already pulls log4j-core); its own distribution binds SLF4J to
# log4j2 with log4j-slf4j-impl, so we do the same, version matching log4j-core.
LOG4J_VERSION=2.25.4

KAFKA_PORT="${PLEDGE_KAFKA_PORT:-59092}"
CONTROLLER_PORT="${PLEDGE_KAFKA_CONTROLLER_PORT:-59093}"
SSL_PORT="${PLEDGE_KAFKA_SSL_PORT:-59094}"
SASL_SSL_PORT="${PLEDGE_KAFKA_SASL_SSL_PORT:-59095}"
KAFKA_HEAP="${PLEDGE_KAFKA_HEAP:--Xms256m -Xmx512m}"
NODE_ID=1

CACHE="$PLEDGE_CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$CACHE/libs"
STATE="$PLEDGE_STATE_DIR/kafka"
DATA="$STATE/data"
CONF="$STATE/server.properties"
LOG4J_CONF="$STATE/log4j2.properties"
TOOLS_LOG4J_CONF="$STATE/tools-log4j2.properties"
PID_FILE="$STATE/kafka.pid"
SERVER_LOG="$STATE/logs/server.log"     # written by log4j2
STDOUT_LOG="$STATE/logs/kafka.out"      # JVM stdout/stderr (crashes, GC warnings)
# After an unclean stop the broker first recovers its logs (26 s seen): allow for it, bounded.
READY_TIMEOUT_S=120
STOP_TIMEOUT_S=30

BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
SSL_BOOTSTRAP="127.0.0.1:$SSL_PORT"
SASL_SSL_BOOTSTRAP="127.0.0.1:$SASL_SSL_PORT"

# TLS material (made once by make_tls) and the SCRAM user of the SASL_SSL listener.
TLS_DIR="$STATE/tls"
SCRAM_USER=pledge
SCRAM_MECHANISMS=(SCRAM-SHA-512 SCRAM-SHA-256)
SCRAM_PASSWORD_FILE="$STATE/scram-password"
# "<cluster id> <sha256 of the password>" once the cluster's metadata holds the SCRAM users with
# that password (added at format time, or on the running broker for storage formatted before).
SCRAM_MARKER="$STATE/scram-users"
# Kafka CLI tools' client settings for the SASL_SSL listener (it holds the password: mode 600).
CLIENT_SASL_SSL_PROPS="$STATE/client-sasl-ssl.properties"

# ---------------------------------------------------------------- toolchain

# Major version of the given java binary ("1.8" -> 8, "17" -> 17); 0 if unknown.
java_major() {
  local v
  v="$("$1" -XshowSettings:properties -version 2>&1 \
    | awk -F'= ' '/java.specification.version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]) }')"
  [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0
}

# Kafka 4 brokers need Java 17+. Prefer JAVA_HOME, then PATH.
ensure_java() {
  JAVA=""
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    JAVA="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null; then
    JAVA="$(command -v java)"
  fi
  if [[ -z $JAVA ]] || (($(java_major "$JAVA") < 17)); then
    log "Java 17+ not found (have: ${JAVA:-none}); installing openjdk-17-jre-headless"
    apt_install openjdk-17-jre-headless
    JAVA=/usr/lib/jvm/java-17-openjdk-amd64/bin/java
    [[ -x $JAVA ]] || JAVA="$(command -v java)"
  fi
  (($(java_major "$JAVA") >= 17)) || die "need Java 17+, $JAVA is $(java_major "$JAVA")"
}

ensure_maven() {
  command -v mvn >/dev/null && return 0
  log "mvn not found; installing Debian's maven"
  apt_install maven
}

# ------------------------------------------------------------------- jars

# Resolve kafka_2.13 + kafka-tools + the SLF4J binding with their runtime
# dependencies into $LIBS. Downloads go to a temp dir that is renamed into
# place only when complete, so an interrupted download is never mistaken for
# a good cache. ~/.m2 is Maven's own cache on top of ours.
fetch_jars() {
  if [[ -f $LIBS/.complete ]]; then
    return 0
  fi
  ensure_maven
  local t0 tmp
  t0="$(now)"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$CACHE/fetch.XXXXXX")"
  cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <!-- Written by integration-tests/scripts/kafka.sh: only used to resolve jars. -->
  <groupId>dev.pledge.it</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  # -U: Maven caches a failed download in ~/.m2 and would not retry it for a
  # day; this runs only when our cache is missing, so always re-check.
  if ! (cd "$tmp" && mvn -B -q -U dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1); then
    tail -n 30 "$tmp/mvn.log" >&2 || true
    die "Maven could not resolve Kafka $KAFKA_VERSION (full log: $tmp/mvn.log)"
  fi
  [[ -f $tmp/libs/kafka_2.13-$KAFKA_VERSION.jar ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing after resolve"
  cp "$tmp/pom.xml" "$tmp/libs/.pom.xml"
  touch "$tmp/libs/.complete"
  rm -rf "$LIBS"
  mv "$tmp/libs" "$LIBS"
  rm -rf "$tmp"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) in $(elapsed_since "$t0") s"
}

# ------------------------------------------------------------ TLS and SCRAM

# A test CA, the broker's certificate (127.0.0.1 and localhost) and a client certificate, made
# once into a temporary directory renamed into place when complete (an interrupted run leaves
# no half set). Keys are unencrypted PKCS#8, which Kafka's PEM keystore reads; the broker's
# keystore file is its key followed by its certificate.
make_tls() {
  [[ -f $TLS_DIR/server-keystore.pem && -f $TLS_DIR/client.key ]] && return 0
  command -v openssl >/dev/null || apt_install openssl
  log "making a test CA, broker and client certificates in $TLS_DIR"
  mkdir -p "$STATE"
  local tmp
  tmp="$(mktemp -d "$STATE/tls.XXXXXX")"
  (
    cd "$tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Pledge test Kafka CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
      'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=pledge-kafka-adapter" -keyout client.key -out client.csr
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
      'extendedKeyUsage=clientAuth' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out client.pem
    cat server.key server.pem >server-keystore.pem
    chmod 600 ./*.key server-keystore.pem
  ) >"$STATE/logs/openssl.log" 2>&1 \
    || { cat "$STATE/logs/openssl.log" >&2; rm -rf "$tmp"; die "openssl: making the test certificates failed"; }
  if ! grep -q 'BEGIN PRIVATE KEY' "$tmp/server-keystore.pem"; then
    rm -rf "$tmp"
    die "openssl wrote a broker key that is not PKCS#8, which Kafka's PEM keystore needs"
  fi
  chmod 755 "$tmp" # the certificates readable by any test process; the keys stay 600
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
}

# The SCRAM user's password: made once (URL-safe base64: nothing Kafka's config syntax or a
# JAAS line would have to escape).
scram_password() {
  if [[ ! -s $SCRAM_PASSWORD_FILE ]]; then
    mkdir -p "$STATE"
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$SCRAM_PASSWORD_FILE.tmp")
    mv "$SCRAM_PASSWORD_FILE.tmp" "$SCRAM_PASSWORD_FILE"
  fi
  local pw
  pw="$(<"$SCRAM_PASSWORD_FILE")"
  [[ $pw =~ ^[A-Za-z0-9_-]+$ ]] || die "$SCRAM_PASSWORD_FILE: not a password this script made; remove it and start again"
  printf '%s' "$pw"
}

# One SCRAM credential as Kafka's tools take it: MECHANISM=[name=...,password=...] (format
# time) or MECHANISM=[password=...] (kafka-configs, which names the user apart).
scram_credential() {
  local mechanism="$1" with_name="$2" pw
  pw="$(scram_password)"
  if [[ $with_name == yes ]]; then
    printf '%s=[name=%s,password=%s]' "$mechanism" "$SCRAM_USER" "$pw"
  else
    printf '%s=[password=%s]' "$mechanism" "$pw"
  fi
}

scram_marker_value() {
  local id
  id="$(sed -n 's/^cluster.id=//p' "$DATA/meta.properties" 2>/dev/null)"
  [[ -n $id ]] || die "no cluster.id in $DATA/meta.properties"
  printf '%s %s' "$id" "$(scram_password | sha256sum | cut -d' ' -f1)"
}

write_client_props() {
  local pw
  pw="$(scram_password)"
  (
    umask 077
    {
      echo "# Written by integration-tests/scripts/kafka.sh: Kafka CLI tools through the SASL_SSL listener."
      echo "security.protocol=SASL_SSL"
      echo "sasl.mechanism=SCRAM-SHA-512"
      echo "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$SCRAM_USER\" password=\"$pw\";"
      echo "ssl.truststore.type=PEM"
      echo "ssl.truststore.location=$TLS_DIR/ca.pem"
    } >"$CLIENT_SASL_SSL_PROPS"
  )
}

# A metadata round trip through the SASL_SSL listener (TLS verified against the test CA, SCRAM
# login), bounded by the deadline. A login refused right after the user was added on the
# running broker (which applies the new metadata a moment later) is tried again until then.
check_sasl_ssl() {
  local deadline="$1" left
  while true; do
    left=$((deadline - SECONDS))
    ((left >= 5)) || left=5
    if timeout "$left" "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" \
      -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "$SASL_SSL_BOOTSTRAP" \
      --command-config "$CLIENT_SASL_SSL_PROPS" --list >/dev/null 2>"$STATE/logs/sasl-check.err"; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      cat "$STATE/logs/sasl-check.err" >&2
      die "the SASL_SSL listener $SASL_SSL_BOOTSTRAP refused a SCRAM login as $SCRAM_USER (logs: $SERVER_LOG)"
    fi
    sleep 0.5
  done
}

# Storage formatted before this script made SCRAM users gets them on the running broker, once
# (the marker remembers the cluster and the password they were added for).
ensure_scram_users() {
  local want m
  want="$(scram_marker_value)"
  if [[ -f $SCRAM_MARKER && "$(<"$SCRAM_MARKER")" == "$want" ]]; then
    return 0
  fi
  log "adding SCRAM user $SCRAM_USER (${SCRAM_MECHANISMS[*]}) on the running broker"
  # One request per mechanism: the broker refuses to alter a user's credentials twice in one.
  for m in "${SCRAM_MECHANISMS[@]}"; do
    run_tool_class kafka.admin.ConfigCommand --bootstrap-server "$BOOTSTRAP" --alter --entity-type users \
      --entity-name "$SCRAM_USER" --add-config "$(scram_credential "$m" no)" >"$STATE/logs/scram.log" 2>&1 \
      || { cat "$STATE/logs/scram.log" >&2; die "adding the $m credentials of $SCRAM_USER failed"; }
  done
  printf '%s' "$want" >"$SCRAM_MARKER"
}

# ----------------------------------------------------------------- config

write_configs() {
  mkdir -p "$STATE/logs" "$DATA"
  make_tls
  cat >"$CONF" <<EOF
# Written by integration-tests/scripts/kafka.sh on each start; edits are lost.
# Single node: this process is both the KRaft controller and the broker.
process.roles=broker,controller
node.id=$NODE_ID
# Dynamic quorum (KIP-853), formatted with --standalone: needs
# controller.quorum.bootstrap.servers, not controller.quorum.voters.
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT,SSL://127.0.0.1:$SSL_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SSL://127.0.0.1:$SSL_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL

# TLS on the SSL and SASL_SSL listeners, from PEM files of the test CA (make_tls). The SSL
# listener wants a client certificate of that CA; SASL_SSL authenticates with SCRAM instead.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs=$DATA

# One node: every internal topic must make do with one replica, or the
# group/transaction coordinators never come up.
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create topics by producing to them, and want consumers to join at once.
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
# Tests of transactions the broker aborts on timeout should not wait the default 10 s for
# the broker's check.
transaction.abort.timed.out.transaction.cleanup.interval.ms=500
# Small test machine (2 cores): fewer threads than the defaults.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
  if [[ -n ${PLEDGE_KAFKA_EXTRA_PROPS:-} ]]; then
    printf '\n# From PLEDGE_KAFKA_EXTRA_PROPS\n%s\n' "$PLEDGE_KAFKA_EXTRA_PROPS" >>"$CONF"
  fi

  # Broker logs go to a file only; stdout stays for JVM-level failures.
  cat >"$LOG4J_CONF" <<EOF
# Written by integration-tests/scripts/kafka.sh.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $SERVER_LOG
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# Per-partition state changes are noise for tests.
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
  write_tools_log4j
}

# CLI tools: warnings and errors to stderr only, like Kafka's tools-log4j2.
write_tools_log4j() {
  mkdir -p "$STATE"
  cat >"$TOOLS_LOG4J_CONF" <<EOF
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

# ---------------------------------------------------------------- process

# The pid in $PID_FILE, if that process is alive AND is our broker (a stale
# pid file after a reboot may name an unrelated process).
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $CONF" || return 1
  echo "$pid"
}

run_tool_class() {
  # Tools are short-lived JVMs: small heap, C1 only, to start fast.
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" \
    -cp "$LIBS/*" "$@"
}

# Cluster id: 16 random bytes as URL-safe base64 without padding (22 chars),
# the format Kafka's Uuid uses; avoids a JVM start for `StorageTool random-uuid`.
new_cluster_id() {
  head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

format_storage() {
  [[ -f $DATA/meta.properties ]] && return 0
  # Half-formatted or foreign data dir: start clean (it is test data).
  rm -rf "$DATA"
  mkdir -p "$DATA"
  local id
  id="$(new_cluster_id)"
  log "formatting KRaft storage (cluster id $id) in $DATA"
  # Feature levels are fixed at format time (e.g. transaction.version=1 to
  # turn off KIP-890 "transactions v2", which 4.x enables by default).
  local feats=() f m
  for f in ${PLEDGE_KAFKA_FEATURES:-}; do
    feats+=(--feature "$f")
  done
  # The SASL_SSL listener's SCRAM user goes into the bootstrap metadata.
  for m in "${SCRAM_MECHANISMS[@]}"; do
    feats+=(--add-scram "$(scram_credential "$m" yes)")
  done
  # --standalone: this node is the sole voter of a dynamic controller quorum.
  run_tool_class kafka.tools.StorageTool format --standalone -t "$id" -c "$CONF" "${feats[@]}" \
    >"$STATE/logs/format.log" 2>&1 \
    || { cat "$STATE/logs/format.log" >&2; die "StorageTool format failed"; }
  scram_marker_value >"$SCRAM_MARKER"
  # The voter set (with the controller's port) is written into the metadata
  # log at format time; remember the ports so a later change is detected.
  printf '%s %s\n' "$KAFKA_PORT" "$CONTROLLER_PORT" >"$STATE/formatted-ports"
}

check_formatted_ports() {
  [[ -f $STATE/formatted-ports ]] || return 0
  local want="$KAFKA_PORT $CONTROLLER_PORT" have
  have="$(<"$STATE/formatted-ports")"
  [[ $have == "$want" ]] || die "storage in $DATA was formatted for ports '$have', now asked for '$want': stop, then rm -rf $STATE (test data) and start again"
}

# Ready = the process lives, the client port accepts connections, the broker
# logged that it finished starting (which in KRaft follows unfencing), and a
# real metadata request through the admin client succeeds. Bounded by the
# deadline; no fixed sleeps.
wait_ready() {
  local pid="$1" deadline="$2"
  until port_open "$KAFKA_PORT" && grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 40 "$SERVER_LOG" "$STDOUT_LOG" >&2 2>/dev/null || true
      die "broker exited during start (logs: $SERVER_LOG, $STDOUT_LOG)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
      die "broker not ready after ${READY_TIMEOUT_S}s (logs: $SERVER_LOG, $STDOUT_LOG); it is still running as pid $pid"
    fi
    sleep 0.2
  done
  # Metadata round trip (ListTopics -> Metadata request), bounded by what is
  # left of the deadline.
  local left=$((deadline - SECONDS))
  ((left >= 5)) || left=5
  timeout "$left" "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" \
    -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --list >/dev/null \
    || die "broker port is open but a metadata request failed (logs: $SERVER_LOG)"
}

cmd_start() {
  local t0 pid
  t0="$(now)"
  ensure_java

  if pid="$(running_pid)"; then
    # Already running (maybe still starting): wait for it, succeed.
    if ! { port_open "$KAFKA_PORT" && grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null; }; then
      log "broker pid $pid is running but not ready yet; waiting"
      wait_ready "$pid" $((SECONDS + READY_TIMEOUT_S))
    fi
    port_open "$SSL_PORT" && port_open "$SASL_SSL_PORT" \
      || die "broker pid $pid serves no SSL/SASL_SSL listener on ports $SSL_PORT/$SASL_SSL_PORT (started by an older kafka.sh?): run $0 stop, then $0 start"
    fetch_jars
    ensure_scram_users
    write_client_props
    log "already running (pid $pid) on $BOOTSTRAP"
    return 0
  fi
  rm -f "$PID_FILE"
  local p
  for p in "$KAFKA_PORT" "$CONTROLLER_PORT" "$SSL_PORT" "$SASL_SSL_PORT"; do
    if port_open "$p"; then
      die "port $p on 127.0.0.1 is in use by something other than our broker (pid file $PID_FILE); set PLEDGE_KAFKA_PORT, PLEDGE_KAFKA_CONTROLLER_PORT, PLEDGE_KAFKA_SSL_PORT or PLEDGE_KAFKA_SASL_SSL_PORT, or stop it"
    fi
  done

  fetch_jars
  check_formatted_ports
  write_configs
  format_storage

  # Fresh log files per start, so the readiness grep cannot see an old run's
  # "started" line; keep the previous run's logs for post-mortems.
  [[ -f $SERVER_LOG ]] && mv -f "$SERVER_LOG" "$SERVER_LOG.prev"
  [[ -f $STDOUT_LOG ]] && mv -f "$STDOUT_LOG" "$STDOUT_LOG.prev"

  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller 127.0.0.1:$CONTROLLER_PORT)"
  local launch_deadline=$((SECONDS + READY_TIMEOUT_S))
  # G1 with short pauses, as Kafka's own scripts; heap kept small for the
  # 2-core test machine. ExitOnOutOfMemoryError: die loudly, not limp.
  # setsid + nohup: the broker must outlive this script and its caller's
  # process group (as pg_ctl does for the postmaster). The inner bash writes
  # its own pid and then execs java, so the pid file names the JVM itself.
  local jvm_flags
  read -r -a jvm_flags <<<"$KAFKA_HEAP"
  jvm_flags+=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$STATE/logs")
  rm -f "$PID_FILE"
  # shellcheck disable=SC2016  # $$ and $1 are for the inner bash
  setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' pledge-kafka "$PID_FILE" \
    "$JAVA" "${jvm_flags[@]}" -cp "$LIBS/*" kafka.Kafka "$CONF" >"$STDOUT_LOG" 2>&1 </dev/null &
  until [[ -s $PID_FILE ]]; do
    ((SECONDS < launch_deadline)) || die "broker launch did not write $PID_FILE"
    sleep 0.05
  done
  pid="$(<"$PID_FILE")"
  wait_ready "$pid" "$launch_deadline"
  ensure_scram_users
  write_client_props
  check_sasl_ssl "$launch_deadline"
  log "ready in $(elapsed_since "$t0") s (pid $pid; log $SERVER_LOG)"
  log "  bootstrap: $BOOTSTRAP (PLAINTEXT), $SSL_BOOTSTRAP (SSL, client certificate), $SASL_SSL_BOOTSTRAP (SASL_SSL, SCRAM)"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  # SIGTERM runs Kafka's shutdown hook: a clean, fast controlled shutdown.
  stop_pid "$pid" broker "$STOP_TIMEOUT_S"
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && port_open "$KAFKA_PORT"; then
    log "running (pid $pid) on $BOOTSTRAP"
  else
    log "not running"
    return 1
  fi
}

# The TLS and SCRAM names are deliberately not the adapter's own variables (PLEDGE_KAFKA_CA,
# PLEDGE_KAFKA_SASL_USERNAME, ...): exported into every test, those would turn broker security
# on in adapters started for the plaintext listener.
cmd_env() {
  printf 'export PLEDGE_KAFKA_PORT=%s\n' "$KAFKA_PORT"
  printf 'export PLEDGE_KAFKA_BOOTSTRAP=%s\n' "$BOOTSTRAP"
  printf 'export PLEDGE_KAFKA_SSL_BOOTSTRAP=%s\n' "$SSL_BOOTSTRAP"
  printf 'export PLEDGE_KAFKA_SASL_SSL_BOOTSTRAP=%s\n' "$SASL_SSL_BOOTSTRAP"
  printf 'export PLEDGE_KAFKA_TLS_CA=%s\n' "$TLS_DIR/ca.pem"
  printf 'export PLEDGE_KAFKA_TLS_CLIENT_CERT=%s\n' "$TLS_DIR/client.pem"
  printf 'export PLEDGE_KAFKA_TLS_CLIENT_KEY=%s\n' "$TLS_DIR/client.key"
  printf 'export PLEDGE_KAFKA_SCRAM_USERNAME=%s\n' "$SCRAM_USER"
  printf 'export PLEDGE_KAFKA_SCRAM_PASSWORD_FILE=%s\n' "$SCRAM_PASSWORD_FILE"
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: $0 tool NAME|MAIN-CLASS [ARGS...]"
  local main="$1"
  shift
  case "$main" in
    topics) main=org.apache.kafka.tools.TopicCommand ;;
    console-producer) main=org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) main=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    transactions) main=org.apache.kafka.tools.TransactionsCommand ;;
    consumer-groups) main=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    metadata-quorum) main=org.apache.kafka.tools.MetadataQuorumCommand ;;
    api-versions) main=org.apache.kafka.tools.BrokerApiVersionsCommand ;;
    configs) main=kafka.admin.ConfigCommand ;;
  esac
  ensure_java
  fetch_jars
  [[ -f $TOOLS_LOG4J_CONF ]] || write_tools_log4j
  run_tool_class "$main" "$@"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  tool) shift; cmd_tool "$@" ;;
  *) echo "usage: $0 start|stop|status|env|tool NAME|MAIN-CLASS [ARGS...]" >&2; exit 2 ;;
esac
