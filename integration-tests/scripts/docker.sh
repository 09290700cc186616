#!/usr/bin/env bash
# A Docker engine for the container tests (tests/compose.rs), and the base images that
# deploy/Dockerfile and deploy/compose.yaml name, on a machine that may have neither.
#
#   docker.sh start        install the engine and compose when absent (Debian's docker.io and
#                          docker-compose), start dockerd in the background when it is not
#                          running, wait (bounded) until it answers; then make sure every
#                          base image exists (see below) and drop the image layers of
#                          deploy/Dockerfile that newer builds replaced. Idempotent: a
#                          second run only checks.
#   docker.sh stop         stop the dockerd this script started (SIGTERM, bounded wait)
#   docker.sh status       exit 0 if an engine answers
#   docker.sh base-images  only the base images (the engine must be running)
#   docker.sh compose ARGS...
#                          run compose (`docker compose` when the plugin exists, else
#                          Debian's `docker-compose`) with ARGS
#   docker.sh env          print exports; use: eval "$(docker.sh env)"
#
# Base images. deploy/ names the images a user pulls: debian:bookworm-slim, rust:1-bookworm,
# postgres:15, apache/kafka:$KAFKA_VERSION and mariadb:10.11 (the integration tests' MariaDB).
# Each is pulled when a registry answers; when
# none does (this project's machines reach only package registries) it is built here, under
# the SAME name, from Debian's packages, so the Dockerfiles and compose.yaml stay exactly what
# a user runs. The substitutes (recipes in deploy/images/, described in deploy/README.md) carry
# the label dev.pledge.substitute; a substitute whose recipe changed is rebuilt (Docker's
# layer cache makes an unchanged one a no-op), a pulled image is left alone.
#   debian:bookworm-slim   debootstrap --variant=minbase bookworm, trimmed as the official
#                          slim image is, then `docker import`
#   rust:1-bookworm        debian:bookworm-slim + build packages + this host's Rust toolchain
#                          (Debian's rustc is older than the workspace's rust-version)
#   postgres:15            debian:bookworm-slim + Debian's postgresql-15 + an entrypoint with
#                          the official image's interface (deploy/images/postgres/)
#   apache/kafka:VERSION   debian:bookworm-slim + a JRE + Kafka's jars from Maven Central,
#                          with the official image's KAFKA_* interface (deploy/images/kafka/)
#   mariadb:10.11          debian:bookworm-slim + Debian's mariadb-server 10.11 + an entrypoint
#                          with the official image's interface (deploy/images/mariadb/)
#
# Environment:
#   PLEDGE_STATE_DIR     default /tmp/pledge-it (dockerd's log and pid in $PLEDGE_STATE_DIR/docker)
#   PLEDGE_CACHE_DIR     default ~/.cache/pledge (the debootstrap tarball, reused)
#   PLEDGE_DOCKER_DATA   default /var/lib/docker (images and the layer cache: kept between runs)
#   PLEDGE_DOCKER_PULL   default 1; 0 skips the pull attempts (straight to the substitutes)
#   PLEDGE_DEBIAN_MIRROR default http://deb.debian.org/debian (debootstrap's, and the slim
#                        image's apt sources)
set -euo pipefail

LOG_TAG=docker
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

STATE="$PLEDGE_STATE_DIR/docker"
DATA_ROOT="${PLEDGE_DOCKER_DATA:-/var/lib/docker}"
PID_FILE="$STATE/dockerd.pid"
LOG_FILE="$STATE/dockerd.log"
SOCKET=/var/run/docker.sock
# dockerd (with its containerd) usually answers within 3 s; a first start on a slow disk
# takes longer.
START_TIMEOUT_S=60
STOP_TIMEOUT_S=30
# A registry that does not resolve fails at once; one that resolves but never answers must
# not hold the run up.
PULL_TIMEOUT_S=60

# The Kafka version of the apache/kafka image compose.yaml names (the jars kafka.sh runs).
KAFKA_VERSION=4.3.1
IMAGES_DIR="$REPO/deploy/images"
SUBSTITUTE_LABEL=dev.pledge.substitute
# Bump when the debian:bookworm-slim recipe below changes (it is rebuilt only then: every
# other image's layer cache hangs off its id).
DEBIAN_RECIPE=1
DEBIAN_MIRROR="${PLEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

engine_up() {
  docker info >/dev/null 2>&1
}

# ------------------------------------------------------------------ install

ensure_installed() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v iptables >/dev/null || missing+=(iptables)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    # Bookworm has no compose v2 plugin; its docker-compose (1.29) reads the Compose
    # Specification compose.yaml is written in.
    missing+=(docker-compose)
  fi
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# ------------------------------------------------------------------ engine

running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(<"$PID_FILE")"
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^dockerd ' || return 1
  echo "$pid"
}

cmd_engine() {
  local t0 pid
  t0="$(now)"
  ensure_installed
  if engine_up; then
    log "engine already running ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    return 0
  fi
  mkdir -p "$STATE"
  local launched=""
  if pid="$(running_pid)"; then
    log "dockerd pid $pid is running but does not answer yet; waiting"
  else
    # A dockerd ended with the rest of a machine's processes (CI ends everything a session
    # left running) leaves its pid file behind.
    rm -f "$PID_FILE"
    [[ -f $LOG_FILE ]] && mv -f "$LOG_FILE" "$LOG_FILE.prev"
    log "starting dockerd (data $DATA_ROOT, log $LOG_FILE)"
    # setsid + nohup: the engine outlives this script and its caller's process group.
    setsid nohup dockerd --data-root "$DATA_ROOT" --pidfile "$PID_FILE" --host "unix://$SOCKET" \
      >"$LOG_FILE" 2>&1 </dev/null &
    launched=$!
  fi
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until engine_up; do
    if [[ -n $launched ]] && ! kill -0 "$launched" 2>/dev/null; then
      tail -n 30 "$LOG_FILE" >&2 || true
      die "dockerd exited during start (log: $LOG_FILE)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$LOG_FILE" >&2 || true
      die "dockerd did not answer on $SOCKET within ${START_TIMEOUT_S}s (log: $LOG_FILE)"
    fi
    sleep 0.2
  done
  log "engine ready in $(elapsed_since "$t0") s ($(docker version --format '{{.Server.Version}}'))"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    log "no dockerd started by this script is running"
    return 0
  fi
  stop_pid "$pid" dockerd "$STOP_TIMEOUT_S"
  rm -f "$PID_FILE"
  log "stopped"
}

# ------------------------------------------------------------------ base images

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# After $1 was rebuilt: removes its previous image $2 (when it was one and is now untagged).
# Not a prune by label: labels are inherited, so every image built on a substitute has ours.
# Refused, harmlessly, while other images are built on the old one.
drop_replaced() {
  local new
  new="$(image_id "$1")"
  if [[ -n $2 && $2 != "$new" ]]; then
    docker rmi "$2" >/dev/null 2>&1 || true
  fi
}

# The value of label $2 on image $1 ("" when absent).
image_label() {
  docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null | sed 's/^<no value>$//'
}

# Pull $1 unless pulls are off; false when no registry gives it.
try_pull() {
  [[ ${PLEDGE_DOCKER_PULL:-1} == 1 ]] || return 1
  local out
  if out="$(timeout "$PULL_TIMEOUT_S" docker pull -q "$1" 2>&1)"; then
    log "pulled $1"
    return 0
  fi
  log "cannot pull $1 (${out##*$'\n'}); building a substitute from Debian's packages"
  return 1
}

# "use" when $1 is there and not ours (pulled: leave it), "build" when it is a substitute
# (docker build again: a no-op from the layer cache unless its recipe changed), "pull-or-build"
# when absent.
plan_for() {
  if ! image_exists "$1"; then
    echo pull-or-build
  elif [[ -z $(image_label "$1" "$SUBSTITUTE_LABEL") ]]; then
    echo use
  else
    echo build
  fi
}

# debian:bookworm-slim: a minbase debootstrap, trimmed like the official slim variant
# (debuerreotype's minimizing config and slimify: no docs, man pages, locales; apt cleans
# after itself; services never start during installs), imported as one layer.
build_debian_slim() {
  local t0 root tarball="$PLEDGE_CACHE_DIR/debian-bookworm-slim-r$DEBIAN_RECIPE.tar"
  t0="$(now)"
  if [[ ! -s $tarball ]]; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    root="$(mktemp -d "$STATE/rootfs.XXXXXX")"
    log "debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR"
    if ! debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1; then
      tail -n 20 "$STATE/debootstrap.log" >&2
      rm -rf "$root"
      die "debootstrap failed (log: $STATE/debootstrap.log)"
    fi
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Installs in a container never start services (there is no init to own them).
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\n' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{groff,info,linda,lintian,locale,man}/* "$root"/var/cache/apt/archives/*.deb \
      "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/* \
      "$root"/tmp/* "$root/etc/resolv.conf" "$root/etc/hostname"
    : >"$root/etc/machine-id"
    mkdir -p "$PLEDGE_CACHE_DIR"
    tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  local old
  old="$(image_id debian:bookworm-slim)"
  docker import \
    --change 'CMD ["bash"]' \
    --change "LABEL $SUBSTITUTE_LABEL=\"debootstrap --variant=minbase bookworm, slimmed (integration-tests/scripts/docker.sh)\"" \
    --change "LABEL dev.pledge.substitute.recipe=$DEBIAN_RECIPE" \
    "$tarball" debian:bookworm-slim >/dev/null
  drop_replaced debian:bookworm-slim "$old"
  log "built debian:bookworm-slim (substitute) in $(elapsed_since "$t0") s"
}

ensure_debian_slim() {
  case "$(plan_for debian:bookworm-slim)" in
    use) return 0 ;;
    build)
      [[ $(image_label debian:bookworm-slim dev.pledge.substitute.recipe) == "$DEBIAN_RECIPE" ]] && return 0
      build_debian_slim
      ;;
    pull-or-build) try_pull debian:bookworm-slim || build_debian_slim ;;
  esac
}

# A build context in $STATE/context-<name>: a copy of deploy/images/<name>/ plus `ca/`, the CA
# certificates this host added to /usr/local/share/ca-certificates. Builders that fetch over
# TLS (cargo, Maven) trust them, so they reach a registry wherever the host does, also behind
# a TLS-intercepting proxy; on most machines there are none. Prints the context's path.
stage_context() {
  local name="$1" ctx="$STATE/context-$1"
  rm -rf "$ctx"
  mkdir -p "$ctx/ca"
  cp -a "$IMAGES_DIR/$name/." "$ctx/"
  if [[ -d /usr/local/share/ca-certificates ]]; then
    find /usr/local/share/ca-certificates -name '*.crt' -type f -exec cp {} "$ctx/ca/" \;
  fi
  echo "$ctx"
}

# Builds substitute image $1 from the context $2 (its Dockerfile), with extra `docker build`
# arguments after.
docker_build_substitute() {
  local name="$1" context="$2" t0 out old
  shift 2
  t0="$(now)"
  out="$STATE/build-${name//[\/:]/_}.log"
  old="$(image_id "$name")"
  if ! docker build --label "$SUBSTITUTE_LABEL=deploy/images (integration-tests/scripts/docker.sh)" \
    -t "$name" "$@" "$context" >"$out" 2>&1; then
    tail -n 30 "$out" >&2
    die "building the substitute $name failed (log: $out)"
  fi
  drop_replaced "$name" "$old"
  log "$name (substitute) ready in $(elapsed_since "$t0") s"
}

# What a rust:1-bookworm substitute is built from: the host's toolchain, the recipe, the CAs.
rust_fingerprint() {
  {
    rustc --version
    cat "$IMAGES_DIR/rust/Dockerfile"
    find /usr/local/share/ca-certificates -name '*.crt' -type f -exec cat {} + 2>/dev/null || true
  } | sha256sum | cut -c1-16
}

# rust:1-bookworm from this host's toolchain: the official image's layout (rustup in
# /usr/local/cargo/bin, toolchains in /usr/local/rustup), the active toolchain only, no docs.
build_rust() {
  if ! command -v rustc >/dev/null || ! command -v rustup >/dev/null; then
    die "rust:1-bookworm cannot be pulled and no host toolchain (rustc, rustup) is on PATH to build it from"
  fi
  local sysroot version host ctx
  sysroot="$(rustc --print sysroot)"
  version="$(rustc --version | awk '{print $2}')"
  host="$(rustc -vV | awk '/^host:/ {print $2}')"
  ctx="$(stage_context rust)"
  mkdir -p "$ctx/toolchain"
  # Hard links when the toolchain is on the same file system (no copy), else a copy.
  local part
  for part in bin lib libexec etc; do
    [[ -e $sysroot/$part ]] || continue
    cp -al "$sysroot/$part" "$ctx/toolchain/" 2>/dev/null || cp -a "$sysroot/$part" "$ctx/toolchain/"
  done
  cp "$(command -v rustup)" "$ctx/rustup"
  docker_build_substitute rust:1-bookworm "$ctx" \
    --build-arg "RUST_VERSION=$version" --build-arg "RUST_HOST=$host" --label "dev.pledge.substitute.rust=$(rust_fingerprint)"
  rm -rf "$ctx"
}

ensure_rust() {
  case "$(plan_for rust:1-bookworm)" in
    use) return 0 ;;
    build)
      # Rebuilt when the host's toolchain, the recipe or the CAs changed (the context is
      # 600 MB: skip sending it otherwise).
      [[ $(image_label rust:1-bookworm dev.pledge.substitute.rust) == "$(rust_fingerprint)" ]] && return 0
      build_rust
      ;;
    pull-or-build) try_pull rust:1-bookworm || build_rust ;;
  esac
}

# Image $1 from deploy/images/$2 (extra `docker build` arguments after).
ensure_built() {
  local name="$1" recipe="$2"
  shift 2
  case "$(plan_for "$name")" in
    use) return 0 ;;
    build) ;;
    pull-or-build) try_pull "$name" && return 0 ;;
  esac
  docker_build_substitute "$name" "$(stage_context "$recipe")" "$@"
}

cmd_base_images() {
  engine_up || die "no Docker engine answers: run $0 start"
  local t0
  t0="$(now)"
  ensure_debian_slim
  ensure_rust
  ensure_built postgres:15 postgres
  ensure_built "apache/kafka:$KAFKA_VERSION" kafka --build-arg "KAFKA_VERSION=$KAFKA_VERSION"
  ensure_built mariadb:10.11 mariadb
  # The build layers of deploy/Dockerfile that a newer build replaced linger untagged (every
  # build of changed sources leaves gigabytes): drop them, and only them (the label is set in
  # its build stages, which no other image descends from). The current build stage
  # is tagged (tests/compose.rs builds `--target build`), so the compiled dependencies stay.
  docker image prune -f --filter "label=dev.pledge.build-stage" >/dev/null
  # Likewise the images built before the current ones (pledge/coordinator:dev, ...).
  docker image prune -f --filter "label=org.opencontainers.image.source=https://github.com/pledge-tx/pledge" >/dev/null
  log "base images ready in $(elapsed_since "$t0") s"
}

# ------------------------------------------------------------------ compose

compose_cmd() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null; then
    echo docker-compose
  else
    die "neither \`docker compose\` nor docker-compose is installed: run $0 start"
  fi
}

cmd_compose() {
  local c
  c="$(compose_cmd)"
  # shellcheck disable=SC2086  # "docker compose" is two words
  exec $c "$@"
}

cmd_env() {
  printf 'export PLEDGE_COMPOSE=%q\n' "$(compose_cmd)"
}

case "${1:-}" in
  start)
    cmd_engine
    cmd_base_images
    ;;
  stop) cmd_stop ;;
  status)
    if engine_up; then log "engine running"; else log "no engine answers"; exit 1; fi
    ;;
  base-images) cmd_base_images ;;
  compose) shift; cmd_compose "$@" ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|status|base-images|compose ARGS...|env" >&2; exit 2 ;;
esac
