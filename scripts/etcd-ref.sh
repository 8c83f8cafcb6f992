#!/usr/bin/env bash
# Builds upstream etcd (server, etcdctl, etcdutl) of one pinned release from the Go module proxy:
# the reference Keel is measured and checked against.
#
#   scripts/etcd-ref.sh [VERSION]     default v3.6.16; also used: v3.7.3
#
# Prints the directory holding the three binaries (target/etcd-ref/VERSION/bin). Builds once per
# version; a second call only prints the directory. The server is a tiny `main` calling
# go.etcd.io/etcd/server/v3/etcdmain.Main; etcdctl and etcdutl are built from their own module
# paths at the same version. Needs the `go` command (1.24 or newer) and the module proxy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ver=${1:-v3.6.16}
case "$ver" in v3.*) ;; *) echo "usage: $0 [v3.X.Y]" >&2; exit 2 ;; esac
dir=$root/target/etcd-ref/$ver
bin=$dir/bin
if [ -x "$bin/etcd" ] && [ -x "$bin/etcdctl" ] && [ -x "$bin/etcdutl" ]; then
  echo "$bin"
  exit 0
fi
go=${ETCD_REF_GO:-$(command -v go)}
[ -n "$go" ] || { echo "etcd-ref: the go command is needed" >&2; exit 1; }
mkdir -p "$dir/src" "$bin"
cd "$dir/src"
cat >go.mod <<MOD
module keel.local/etcdref
go 1.24
MOD
cat >main.go <<'MAIN'
// The etcd server of the pinned release (what etcd's own server/main.go does).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
MAIN
export GO111MODULE=on GOFLAGS=-mod=mod
"$go" get "go.etcd.io/etcd/server/v3@$ver" "go.etcd.io/etcd/etcdctl/v3@$ver" "go.etcd.io/etcd/etcdutl/v3@$ver" >&2
"$go" build -trimpath -o "$bin/etcd" . >&2
"$go" build -trimpath -o "$bin/etcdctl" go.etcd.io/etcd/etcdctl/v3 >&2
"$go" build -trimpath -o "$bin/etcdutl" go.etcd.io/etcd/etcdutl/v3 >&2
"$bin/etcd" --version >&2
echo "$bin"
