#!/usr/bin/env bash
# Installs the Debian packages the build needs and a fresh machine may lack: cmake and the
# development headers librdkafka (bundled by the rdkafka crate) compiles against.
#
#   build-deps.sh        install what is missing (quiet when nothing is)
set -euo pipefail
LOG_TAG=build-deps
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# package -> a file it provides, to tell whether it is there without asking dpkg per package.
declare -A needs=(
  [cmake]=/usr/bin/cmake
  [libcurl4-openssl-dev]=/usr/include/x86_64-linux-gnu/curl/curl.h
  [libssl-dev]=/usr/include/openssl/ssl.h
  [zlib1g-dev]=/usr/include/zlib.h
  # openssl-sys (librdkafka's SSL, for the Kafka adapter's SSL/SASL_SSL) finds OpenSSL through it.
  [pkg-config]=/usr/bin/pkg-config
  [g++]=/usr/bin/g++
  [make]=/usr/bin/make
)
missing=()
for pkg in "${!needs[@]}"; do
  # curl.h lives under a multiarch directory; accept it anywhere under /usr/include.
  if [[ $pkg == libcurl4-openssl-dev ]]; then
    compgen -G '/usr/include/*/curl/curl.h' >/dev/null || compgen -G '/usr/include/curl/curl.h' >/dev/null || missing+=("$pkg")
  elif [[ ! -e ${needs[$pkg]} ]]; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
