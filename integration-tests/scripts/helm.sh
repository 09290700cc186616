#!/usr/bin/env bash
# The Helm chart in deploy/helm/pledge: install a pinned helm (when absent) and check the chart.
#
#   helm.sh install   install helm if absent (cached), print its path on stdout
#   helm.sh env       the same, printed as an export; use: eval "$(helm.sh env)"
#   helm.sh check     helm lint --strict, then helm template, over the default values and
#                     every values file in the chart's ci/ folder (each must render)
#
# There is no Kubernetes cluster on the machines this runs on: these checks render the chart
# and lint it; integration-tests/tests/helm.rs then reads what was rendered and checks it
# against the binaries (every flag a container is given must be one the binary accepts).
#
# Environment:
#   PLEDGE_HELM        a helm binary to use instead of the pinned one (no install then)
#   PLEDGE_TOOLS_DIR   default ~/.cache/pledge/tools (helm in $PLEDGE_TOOLS_DIR/bin, reused)
#   GO                 the go binary; default: go on PATH, else /usr/local/go/bin/go
set -euo pipefail

LOG_TAG=helm
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$HERE/lib.sh"

# PINNED. Built from source through the Go module proxy (the only place helm can come from
# here: no GitHub release downloads). v3.21.4 is the newest v3 the proxy served whole.
HELM_MODULE=helm.sh/helm/v3
HELM_VERSION=v3.21.4

TOOLS_DIR="${PLEDGE_TOOLS_DIR:-$PLEDGE_CACHE_DIR/tools}"
PINNED_HELM="$TOOLS_DIR/bin/helm"
CHART="$(cd "$HERE/../.." && pwd)/deploy/helm/pledge"
# A from-source build of helm takes minutes on two cores; more than this is a hung download.
INSTALL_TIMEOUT_S=1800

# The version a helm binary reports ("v3.21.4"), empty if it does not run.
helm_version() {
  "$1" version --template '{{.Version}}' 2>/dev/null || true
}

find_go() {
  if [[ -n ${GO:-} ]]; then
    [[ -x $GO ]] || die "GO=$GO is not an executable"
    echo "$GO"
  elif command -v go >/dev/null; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    die "go not found (set GO, or put go on PATH): it builds helm $HELM_VERSION from the Go module proxy"
  fi
}

# Print the path of the helm to use, installing the pinned one when it is absent or another
# version. The build goes to a temporary directory renamed into place only when it is
# complete, so an interrupted install is never mistaken for a good cache.
ensure_helm() {
  if [[ -n ${PLEDGE_HELM:-} ]]; then
    [[ -x $PLEDGE_HELM ]] || die "PLEDGE_HELM=$PLEDGE_HELM is not an executable"
    echo "$PLEDGE_HELM"
    return 0
  fi
  if [[ -x $PINNED_HELM && $(helm_version "$PINNED_HELM") == "$HELM_VERSION" ]]; then
    echo "$PINNED_HELM"
    return 0
  fi
  local go t0 tmp gomod client_go k8s_minor ldflags
  go="$(find_go)"
  t0="$(now)"
  log "installing helm $HELM_VERSION into $TOOLS_DIR/bin with $("$go" env GOVERSION) (go install; takes minutes)"
  mkdir -p "$TOOLS_DIR/bin"
  tmp="$(mktemp -d "$TOOLS_DIR/install.XXXXXX")"
  # GOTOOLCHAIN=local: build with this go, never download another toolchain (not reachable).
  # -buildvcs=false: the module cache is no git checkout. CGO off, as helm's own release builds.
  export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
  # helm's Makefile stamps the version and the Kubernetes version `helm template` and `helm lint`
  # assume (client-go v0.X -> Kubernetes 1.X) with -ldflags; a bare `go install` leaves them at
  # "v3.21" and 1.20, and a chart's kubeVersion is checked against the latter. Same stamps here,
  # the Kubernetes minor read from helm's own go.mod.
  gomod="$(timeout "$INSTALL_TIMEOUT_S" "$go" mod download -json "$HELM_MODULE@$HELM_VERSION" \
    | awk -F'"' '$2 == "GoMod" { print $4 }')" \
    || die "go mod download $HELM_MODULE@$HELM_VERSION failed"
  [[ -f $gomod ]] || die "no go.mod for $HELM_MODULE@$HELM_VERSION in the module cache"
  client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "$gomod")"
  [[ $client_go =~ ^v0\.([0-9]+)\. ]] || die "cannot read the k8s.io/client-go version from $gomod: '$client_go'"
  k8s_minor="${BASH_REMATCH[1]}"
  ldflags="-w -s -X $HELM_MODULE/internal/version.version=$HELM_VERSION"
  ldflags+=" -X $HELM_MODULE/pkg/lint/rules.k8sVersionMajor=1 -X $HELM_MODULE/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
  ldflags+=" -X $HELM_MODULE/pkg/chartutil.k8sVersionMajor=1 -X $HELM_MODULE/pkg/chartutil.k8sVersionMinor=$k8s_minor"
  if ! GOBIN="$tmp" timeout "$INSTALL_TIMEOUT_S" "$go" install -trimpath -ldflags "$ldflags" \
      "$HELM_MODULE/cmd/helm@$HELM_VERSION" >"$tmp/go.log" 2>&1; then
    tail -n 30 "$tmp/go.log" >&2 || true
    die "go install $HELM_MODULE/cmd/helm@$HELM_VERSION failed or took over $INSTALL_TIMEOUT_S s (log: $tmp/go.log)"
  fi
  [[ $(helm_version "$tmp/helm") == "$HELM_VERSION" ]] \
    || die "the helm built in $tmp does not report $HELM_VERSION: $(helm_version "$tmp/helm")"
  mv -f "$tmp/helm" "$PINNED_HELM"
  rm -rf "$tmp"
  log "installed helm $HELM_VERSION (Kubernetes 1.$k8s_minor) in $(elapsed_since "$t0") s: $PINNED_HELM"
  echo "$PINNED_HELM"
}

# The values files the chart is checked with: the defaults (none), then each ci/ file.
values_sets() {
  echo ""
  local f
  for f in "$CHART"/ci/*.yaml; do
    [[ -e $f ]] || die "no values files in $CHART/ci: the rich configurations must be checked too"
    echo "$f"
  done
}

cmd_check() {
  local helm t0 values name out
  helm="$(ensure_helm)"
  t0="$(now)"
  out="$(mktemp -d)"
  while IFS= read -r values; do
    local args=()
    name="default values"
    if [[ -n $values ]]; then
      args=(--values "$values")
      name="${values#"$CHART"/}"
    fi
    "$helm" lint --strict "$CHART" "${args[@]}" >"$out/lint.log" 2>&1 \
      || { cat "$out/lint.log" >&2; die "helm lint --strict failed with $name"; }
    # --namespace: a fixed one, so the rendering does not depend on the caller's kube context.
    "$helm" template pledge "$CHART" --namespace pledge "${args[@]}" >"$out/rendered.yaml" 2>"$out/template.log" \
      || { cat "$out/template.log" >&2; die "helm template failed with $name"; }
    log "$name: lint --strict clean, rendered $(grep -c '^kind: ' "$out/rendered.yaml") objects"
  done < <(values_sets)
  rm -rf "$out"
  log "chart checked in $(elapsed_since "$t0") s"
}

case "${1:-}" in
  install) ensure_helm ;;
  env)
    # Assigned first: a failed install must fail this command, not print an empty export.
    helm="$(ensure_helm)"
    printf 'export PLEDGE_HELM=%s\n' "$helm"
    ;;
  check) cmd_check ;;
  *) echo "usage: $0 install|env|check" >&2; exit 2 ;;
esac
