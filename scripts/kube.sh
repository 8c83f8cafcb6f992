#!/usr/bin/env bash
# kube-apiserver on a 3-member Keel cluster: builds kube-apiserver from the Go module proxy
# (k8s.io/kubernetes at a pinned release, its staging modules pinned to the matching v0.X.Y),
# starts three Keel members on 127.0.0.1-3 and kube-apiserver on them, and checks what
# Kubernetes needs from its store:
#
#   - lists with pagination (limit/continue) served by the store: configmaps have no watch cache
#     here (--watch-cache-sizes=configmaps#0), so every page is a range read at one revision;
#   - watches served by the store's watch (configmaps) and by the watch cache (secrets), every
#     event in order;
#   - compaction: kube-apiserver's own compactor compacts Keel; a continue token and a watch from
#     before it then get 410 Gone, as on etcd;
#   - RequestWatchProgress in use: consistent lists of secrets are served from the watch cache
#     (apiserver_watch_cache_consistent_read_total with fallback="false"), which kube-apiserver
#     does only when the store reports an etcd version that has progress requests (3.7 here);
#   - RangeStream in use: lists of configmaps are streamed (apiserver_storage_list_duration_seconds
#     with streamed="true"), which kube-apiserver 1.37 does when the store answers RangeStream.
#
#   scripts/kube.sh            build what is missing, run the checks, stop everything
#   scripts/kube.sh biglist    a LIST of 100,000 configmaps of 1 KiB (KUBE_BIG_N) through
#                              kube-apiserver, served by RangeStream (EtcdRangeStream on; no
#                              watch cache for configmaps), unpaginated and paginated, on 3 Keel
#                              members and then on 3 etcd 3.7.3 members: every object listed once,
#                              each member's peak resident memory during each LIST and its time
#   scripts/kube.sh rolling    kube-apiserver on 3 etcd 3.7.3 members, the members replaced by
#                              Keel members one by one (learner add, start, promote, remove)
#                              and then by etcd members again, with kube-apiserver serving:
#                              after every step every member's HashKV agrees, and objects are
#                              created, listed and watched through it (a watch served by the
#                              store and one by the watch cache see every new object once, in
#                              order)
#
# Environment: KUBE_VERSION (default v1.37.2), KEEL_BIN (default target/release/keel, built if
# missing), KUBE_WORK (scratch directory, default target/kube-run). Needs go, curl, jq, openssl.
# Prints one line per check and `kube: N checks passed`; exits non-zero at the first failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kver=${KUBE_VERSION:-v1.37.2}
minor=${kver#v1.}
minor=${minor%%.*}
staging=v0.${kver#v1.}
build=$root/target/kube/$kver
kas=$build/bin/kube-apiserver
work=${KUBE_WORK:-$root/target/kube-run}
keel=${KEEL_BIN:-$root/target/release/keel}

main() {
  if [ "${1:-}" = rolling ]; then
    rolling
    return
  fi
  if [ "${1:-}" = biglist ]; then
    biglist
    return
  fi
  build_apiserver
  if [ ! -x "$keel" ]; then (cd "$root" && cargo build --release --bin keel); fi
  ctl=$("$root/scripts/etcd-ref.sh")/etcdctl
  rm -rf "$work"
  mkdir -p "$work"
  trap stop_all EXIT
  start_keel
  start_apiserver
  checks
  echo "kube: $passed checks passed (kube-apiserver $kver on 3 Keel members)"
}

# Builds kube-apiserver once per version, with its version stamped (feature gates and the
# emulation version depend on it).
build_apiserver() {
  [ -x "$kas" ] && return 0
  mkdir -p "$build/bin"
  cd "$build"
  {
    echo "module keel.local/kube"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $kver"
  } >go.mod
  # k8s.io/kubernetes replaces its staging modules with ./staging; a module depending on it
  # must name their published versions itself.
  local gomod
  gomod=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$kver" | jq -r .GoMod)
  grep -o 'k8s.io/[a-z0-9-]* => ./staging' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}' >>go.mod
  printf '//go:build tools\n\npackage kube\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' >tools.go
  GOFLAGS=-mod=mod go mod tidy
  local pkg=k8s.io/component-base/version
  go build -ldflags "-X $pkg.gitVersion=$kver -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean" \
    -o "$kas" k8s.io/kubernetes/cmd/kube-apiserver
  cd "$root"
}

pids=()
# Stops kube-apiserver and the watches first (newest first), then the Keel members; a process
# that has not gone after 10 s (kube-apiserver drains for long without its store) is killed.
stop_all() {
  local i p
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p=${pids[i]}
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}

passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() {
  echo "FAIL $*" >&2
  echo "--- kube-apiserver log (last lines)" >&2
  tail -20 "$work/kube-apiserver.log" >&2 || true
  exit 1
}

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local secs=$1 i
  shift
  for i in $(seq 1 $((secs * 10))); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

# Starts 3 members of BIN (default Keel) on 127.0.0.1-3; their pids are pids[0..2].
start_keel() {
  local bin=${1:-$keel} cluster="" i
  for i in 1 2 3; do cluster+="k$i=http://127.0.0.$i:24800,"; done
  cluster=${cluster%,}
  eps=""
  for i in 1 2 3; do
    "$bin" --name "k$i" --data-dir "$work/k$i" \
      --listen-client-urls "http://127.0.0.$i:24790" --advertise-client-urls "http://127.0.0.$i:24790" \
      --listen-peer-urls "http://127.0.0.$i:24800" --initial-advertise-peer-urls "http://127.0.0.$i:24800" \
      --initial-cluster "$cluster" --initial-cluster-token kube >"$work/k$i.log" 2>&1 &
    pids+=($!)
    eps+="http://127.0.0.$i:24790,"
  done
  eps=${eps%,}
  healthy() { "$ctl" --endpoints "$eps" endpoint health >/dev/null 2>&1; }
  wait_for 60 healthy || fail "the cluster of $(basename "$bin") did not become healthy"
  ok "3 members ($(basename "$bin")) healthy; they report etcd $(curl -s http://127.0.0.1:24790/version | jq -r .etcdserver)"
}

token=keel-kube-admin
api=https://127.0.0.1:24443
k() { curl -sk -H "Authorization: Bearer $token" "$@"; }

start_apiserver() {
  openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
  openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
  echo "$token,admin,1,\"system:masters\"" >"$work/tokens.csv"
  # No endpoint reconciler: Kubernetes 1.37 refuses a loopback advertise address with one.
  "$kas" --etcd-servers="$eps" --bind-address=127.0.0.1 --secure-port=24443 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --cert-dir="$work/certs" --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$work/sa.pub" --service-account-signing-key-file="$work/sa.key" \
    --token-auth-file="$work/tokens.csv" --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 \
    --etcd-compaction-interval="${compaction_interval:-10s}" --watch-cache-sizes=configmaps#0 --feature-gates=EtcdRangeStream=true \
    --request-timeout=5m >"$work/kube-apiserver.log" 2>&1 &
  pids+=($!)
  ready() { [ "$(k "$api/readyz" 2>/dev/null)" = ok ]; }
  wait_for 180 ready || fail "kube-apiserver did not become ready"
  ok "kube-apiserver $(k "$api/version" | jq -r .gitVersion) ready on ${store:-Keel}"
  if grep -q "RequestWatchProgress feature is not supported" "$work/kube-apiserver.log"; then
    fail "kube-apiserver found RequestWatchProgress unsupported"
  fi
}

# Creates N objects of KIND (configmaps|secrets) named PREFIX-i in namespace keel.
create() {
  local kind=$1 n=$2 prefix=$3 i body
  for i in $(seq 0 $((n - 1))); do
    if [ "$kind" = configmaps ]; then
      body="{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"$prefix-$i\"},\"data\":{\"i\":\"$i\"}}"
    else
      body="{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"name\":\"$prefix-$i\"},\"stringData\":{\"i\":\"$i\"}}"
    fi
    k -o /dev/null -w '%{http_code}\n' -H 'Content-Type: application/json' -X POST \
      "$api/api/v1/namespaces/keel/$kind" -d "$body" | grep -qx 201 || fail "create $kind $prefix-$i"
  done
}

# Lists KIND page by page (PAGE per page, from etcd's revision of the first page); prints names.
list_paged() {
  local kind=$1 page=$2 cont="" out
  while :; do
    out=$(k "$api/api/v1/namespaces/keel/$kind?limit=$page${cont:+&continue=$cont}")
    jq -e '.items' <<<"$out" >/dev/null || fail "list $kind: $out"
    [ "$(jq '.items | length' <<<"$out")" -le "$page" ] || fail "list $kind: a page larger than $page"
    jq -r '.items[].metadata.name' <<<"$out"
    cont=$(jq -r '.metadata.continue // ""' <<<"$out")
    [ -n "$cont" ] || break
  done
}

# Counts watch events of TYPE in FILE.
events() { jq -r '.type' "$2" 2>/dev/null | grep -cx "$1" || true; }

checks() {
  k -o /dev/null -H 'Content-Type: application/json' -X POST "$api/api/v1/namespaces" \
    -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"keel"}}'
  local rv0
  rv0=$(k "$api/api/v1/namespaces/keel/configmaps" | jq -r .metadata.resourceVersion)
  [[ "$rv0" =~ ^[0-9]+$ ]] || fail "no resourceVersion from a list"

  # Watches from before the writes: one served by the store (configmaps), one by the cache.
  k -N "$api/api/v1/namespaces/keel/configmaps?watch=1&resourceVersion=$rv0" >"$work/watch-cm.json" &
  pids+=($!)
  k -N "$api/api/v1/namespaces/keel/secrets?watch=1&resourceVersion=$rv0" >"$work/watch-secrets.json" &
  pids+=($!)

  create configmaps 250 cm
  create secrets 60 s
  k -o /dev/null -H 'Content-Type: application/merge-patch+json' -X PATCH \
    "$api/api/v1/namespaces/keel/configmaps/cm-0" -d '{"data":{"i":"changed"}}'
  k -o /dev/null -X DELETE "$api/api/v1/namespaces/keel/configmaps/cm-1"
  ok "250 configmaps and 60 secrets created, one configmap changed, one deleted"

  # Pagination straight from the store: every name once, none missing.
  local names
  names=$(list_paged configmaps 40)
  [ "$(wc -l <<<"$names")" = 249 ] || fail "paged list: $(wc -l <<<"$names") configmaps, want 249"
  [ "$(sort -u <<<"$names" | wc -l)" = 249 ] || fail "paged list: duplicate names"
  grep -qx cm-1 <<<"$names" && fail "paged list: the deleted configmap is listed"
  ok "paged list of configmaps (limit 40, 7 pages, served by Keel): 249 distinct names"
  local streamed
  streamed=$(k "$api/metrics" | awk '/^apiserver_storage_list_duration_seconds_count\{/ && /resource="configmaps"/ && /streamed="true"/ { s += $2 } END { print s + 0 }')
  [ "$streamed" -ge 7 ] || fail "lists of configmaps streamed by RangeStream: $streamed, want at least 7 (RangeStream not in use)"
  ok "lists of configmaps served by RangeStream: $streamed"

  # Watches: every event, in resourceVersion order.
  cm_events() { [ "$(events ADDED "$work/watch-cm.json")" = 250 ] && [ "$(events MODIFIED "$work/watch-cm.json")" = 1 ] &&
    [ "$(events DELETED "$work/watch-cm.json")" = 1 ]; }
  wait_for 30 cm_events || fail "configmap watch: $(jq -r .type "$work/watch-cm.json" | sort | uniq -c | tr '\n' ' ')"
  secret_events() { [ "$(events ADDED "$work/watch-secrets.json")" = 60 ]; }
  wait_for 30 secret_events || fail "secret watch: $(events ADDED "$work/watch-secrets.json") ADDED events, want 60"
  for f in watch-cm watch-secrets; do
    jq -r '.object.metadata.resourceVersion' "$work/$f.json" | awk 'NR > 1 && $1 + 0 <= prev { bad = 1 } { prev = $1 + 0 } END { exit bad }' ||
      fail "$f: resourceVersions out of order"
  done
  ok "watch of configmaps (Keel's watch): 250 ADDED, 1 MODIFIED, 1 DELETED in order; watch of secrets (watch cache): 60 ADDED in order"

  # Consistent lists from the watch cache need RequestWatchProgress.
  local i
  for i in 1 2 3 4 5; do
    [ "$(k "$api/api/v1/namespaces/keel/secrets" | jq '.items | length')" = 60 ] || fail "consistent list of secrets"
  done
  local served
  served=$(k "$api/metrics" | awk '/^apiserver_watch_cache_consistent_read_total\{/ && /resource="secrets"/ && /fallback="false"/ && /success="true"/ { s += $2 } END { print s + 0 }')
  [ "$served" -ge 5 ] || fail "consistent reads of secrets from the watch cache: $served, want at least 5 (RequestWatchProgress not in use)"
  ok "consistent lists of secrets served from the watch cache: $served (RequestWatchProgress in use)"

  # Compaction by kube-apiserver's compactor: an old continue token and an old watch get 410.
  local first cont
  first=$(k "$api/api/v1/namespaces/keel/configmaps?limit=10")
  cont=$(jq -r .metadata.continue <<<"$first")
  local rev
  rev=$(jq -r .metadata.resourceVersion <<<"$first")
  compacted() {
    local out
    out=$("$ctl" --endpoints "$eps" get --rev="$rev" /registry/configmaps/keel/cm-2 2>&1 >/dev/null || true)
    grep -q "required revision has been compacted" <<<"$out"
  }
  wait_for 120 compacted || fail "kube-apiserver's compactor did not compact Keel past revision $rev"
  ok "kube-apiserver compacted Keel past revision $rev"
  local code
  code=$(k -o "$work/expired.json" -w '%{http_code}' "$api/api/v1/namespaces/keel/configmaps?limit=10&continue=$cont")
  [ "$code" = 410 ] || fail "continue token from before the compaction: HTTP $code, want 410"
  ok "continue token from before the compaction: 410 $(jq -r .reason "$work/expired.json")"
  local old
  old=$(timeout 10 curl -sk -N -H "Authorization: Bearer $token" \
    "$api/api/v1/namespaces/keel/configmaps?watch=1&resourceVersion=$rv0" | head -1 || true)
  [ "$(jq -r '.object.code' <<<"$old")" = 410 ] || fail "watch from before the compaction: $old"
  ok "watch from before the compaction: ERROR 410 ($(jq -r .object.message <<<"$old" | cut -c1-60))"
}

# --- rolling migration: etcd -> Keel -> etcd under kube-apiserver -------------------------
declare -A mpid
live=()

# Starts member NAME on 127.0.0.IP with BIN; extra flags after.
start_member() {
  local name=$1 ip=$2 bin=$3
  shift 3
  "$bin" --name "$name" --data-dir "$work/$name" \
    --listen-client-urls "http://127.0.0.$ip:24790" --advertise-client-urls "http://127.0.0.$ip:24790" \
    --listen-peer-urls "http://127.0.0.$ip:24800" --initial-advertise-peer-urls "http://127.0.0.$ip:24800" \
    --initial-cluster-token kube "$@" >"$work/$name.log" 2>&1 &
  mpid[$name]=$!
  pids+=($!)
}

live_eps() { local IFS=,; echo "${live[*]}"; }

# Every live member's HashKV at one revision (the lowest any of them reports) is the same.
hashes_agree() {
  local rev out
  rev=$("$ctl" --endpoints "$(live_eps)" endpoint status -w json 2>/dev/null | jq '[.[].Status.header.revision] | min') || return 1
  [[ "$rev" =~ ^[0-9]+$ ]] || return 1
  out=$("$ctl" --endpoints "$(live_eps)" endpoint hashkv --rev="$rev" -w json 2>/dev/null) || return 1
  [ "$(jq '[.[].HashKV.hash] | unique | length' <<<"$out")" = 1 ] && [ "$(jq 'length' <<<"$out")" = "${#live[@]}" ]
}

# Replaces member OLD (on 127.0.0.OLDIP) by NEW on 127.0.0.NEWIP running BIN.
replace_member() {
  local old=$1 oldip=$2 new=$3 newip=$4 bin=$5 out ic id oldid
  # etcd refuses a change until every member has been connected for 5 s ("unhealthy cluster").
  add() { out=$("$ctl" --endpoints "$(live_eps)" member add "$new" --learner --peer-urls="http://127.0.0.$newip:24800" 2>&1); }
  wait_for 60 add || fail "member add $new: $out"
  id=$(grep -oE 'Member +[0-9a-f]+ added' <<<"$out" | awk '{print $2}')  # %16x: space-padded
  ic=$(sed -n 's/^ETCD_INITIAL_CLUSTER="\(.*\)"$/\1/p' <<<"$out")
  start_member "$new" "$newip" "$bin" --initial-cluster "$ic" --initial-cluster-state existing
  promote() { "$ctl" --endpoints "$(live_eps)" member promote "$id" >/dev/null 2>&1; }
  wait_for 120 promote || fail "promote $new ($id)"
  live+=("http://127.0.0.$newip:24790")
  # The simple listing has hex IDs (jq would round the JSON's 64-bit ones).
  oldid=$("$ctl" --endpoints "$(live_eps)" member list | awk -F', ' -v n="$old" '$3 == n { print $1 }')
  remove() { "$ctl" --endpoints "$(live_eps)" member remove "$oldid" >/dev/null 2>&1; }
  wait_for 60 remove || fail "member remove $old ($oldid)"
  local keep=() u
  for u in "${live[@]}"; do [ "$u" = "http://127.0.0.$oldip:24790" ] || keep+=("$u"); done
  live=("${keep[@]}")
  kill -TERM "${mpid[$old]}" 2>/dev/null || true
  wait "${mpid[$old]}" 2>/dev/null || true
  wait_for 60 hashes_agree || fail "HashKV differs after $old was replaced by $new"
}

# Objects through kube-apiserver at STEP: watches opened (configmaps: served by the store;
# secrets: by the watch cache), 20 configmaps and 5 secrets created, all listed, and both
# watches deliver every new object once, in order.
step_objects() {
  local step=$1 total=$2 rv f
  rv=$(k "$api/api/v1/namespaces/keel/configmaps" | jq -r .metadata.resourceVersion)
  [[ "$rv" =~ ^[0-9]+$ ]] || fail "step $step: no resourceVersion from a list"
  k -N "$api/api/v1/namespaces/keel/configmaps?watch=1&resourceVersion=$rv" >"$work/watch-cm-$step.json" &
  local wcm=$!
  k -N "$api/api/v1/namespaces/keel/secrets?watch=1&resourceVersion=$rv" >"$work/watch-s-$step.json" &
  local ws=$!
  pids+=("$wcm" "$ws")
  create configmaps 20 "cm$step"
  create secrets 5 "s$step"
  local names
  names=$(list_paged configmaps 40)
  [ "$(wc -l <<<"$names")" = "$total" ] || fail "step $step: $(wc -l <<<"$names") configmaps listed, want $total"
  seen() { [ "$(events ADDED "$work/watch-cm-$step.json")" = 20 ] && [ "$(events ADDED "$work/watch-s-$step.json")" = 5 ]; }
  wait_for 60 seen || fail "step $step: watches saw $(events ADDED "$work/watch-cm-$step.json") configmaps and $(events ADDED "$work/watch-s-$step.json") secrets ADDED, want 20 and 5"
  for f in "watch-cm-$step" "watch-s-$step"; do
    jq -r '.object.metadata.resourceVersion' "$work/$f.json" | awk 'NR > 1 && $1 + 0 <= prev { bad = 1 } { prev = $1 + 0 } END { exit bad }' ||
      fail "$f: resourceVersions out of order"
  done
  kill "$wcm" "$ws" 2>/dev/null || true
}

rolling() {
  build_apiserver
  if [ ! -x "$keel" ]; then (cd "$root" && cargo build --release --bin keel); fi
  local ref etcd_bin
  ref=$("$root/scripts/etcd-ref.sh" v3.7.3)
  ctl=$ref/etcdctl
  etcd_bin=$ref/etcd
  rm -rf "$work"
  mkdir -p "$work"
  trap stop_all EXIT
  local cluster="e1=http://127.0.0.1:24800,e2=http://127.0.0.2:24800,e3=http://127.0.0.3:24800" i
  for i in 1 2 3; do
    start_member "e$i" "$i" "$etcd_bin" --initial-cluster "$cluster"
    live+=("http://127.0.0.$i:24790")
  done
  healthy() { "$ctl" --endpoints "$(live_eps)" endpoint health >/dev/null 2>&1; }
  wait_for 60 healthy || fail "the etcd cluster did not become healthy"
  # kube-apiserver knows every address a member will have (its etcd client skips the dead).
  eps=$(for i in $(seq 1 9); do printf 'http://127.0.0.%s:24790,' "$i"; done)
  eps=${eps%,}
  store="etcd 3.7.3" start_apiserver
  k -o /dev/null -H 'Content-Type: application/json' -X POST "$api/api/v1/namespaces" \
    -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"keel"}}'
  local step=0 total=20
  step_objects 0 20
  ok "kube-apiserver on 3 etcd 3.7.3 members: 20 configmaps and 5 secrets created, listed and watched"
  # In: e1-e3 (127.0.0.1-3) by Keel k1-k3 (.4-.6); out: k1-k3 by etcd f1-f3 (.7-.9).
  local from to base bin kind
  for pass in "e k 0 keel" "k f 3 etcd"; do
    read -r from to base kind <<<"$pass"
    bin=$keel
    [ "$kind" = etcd ] && bin=$etcd_bin
    for i in 1 2 3; do
      step=$((step + 1))
      replace_member "$from$i" "$((base + i))" "$to$i" "$((base + 3 + i))" "$bin"
      total=$((total + 20))
      step_objects "$step" "$total"
      ok "$from$i replaced by $kind member $to$i: HashKV equal; $total configmaps listed; new objects watched (store and watch cache) in order"
    done
  done
  echo "kube: $passed checks passed (kube-apiserver $kver; etcd 3.7.3 -> Keel -> etcd 3.7.3, one member at a time)"
}

# --- a LIST of 100,000 configmaps ------------------------------------------------------------
big_n=${KUBE_BIG_N:-100000}

# Writes N configmaps of 1 KiB (big-000000...) into namespace keel straight through the store's
# /v3 gateway at URL, 128 per transaction, as kube-apiserver stores objects (its storage decoder
# reads JSON as it reads its own protobuf): through kube-apiserver one by one it would take an
# hour here.
load_big() {
  python3 - "$1" "$2" <<'PY'
import base64, json, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
b64 = lambda s: base64.b64encode(s.encode()).decode()
ops = []
for i in range(n):
    name = f"big-{i:06d}"
    obj = {"kind": "ConfigMap", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": "keel", "uid": f"00000000-0000-4000-8000-{i:012d}",
                        "creationTimestamp": "2026-12-05T00:00:00Z"},
           "data": {"v": "x" * 1024}}
    ops.append({"request_put": {"key": b64(f"/registry/configmaps/keel/{name}"), "value": b64(json.dumps(obj, separators=(",", ":")))}})
    if len(ops) == 128 or i == n - 1:
        body = json.dumps({"success": ops}).encode()
        urllib.request.urlopen(urllib.request.Request(url + "/v3/kv/txn", data=body, headers={"Content-Type": "application/json"})).read()
        ops = []
PY
}

# Resets the peak resident memory of the member processes (pids[0..2]).
reset_peaks() { local i; for i in 0 1 2; do echo 5 >"/proc/${pids[i]}/clear_refs"; done; }
# "k1 123 MiB, k2 ..." : each member's peak resident memory since the last reset, in MiB.
peaks() {
  local i out=""
  for i in 0 1 2; do out+="k$((i + 1)) $(awk '/^VmHWM/ { printf "%d", $2 / 1024 }' "/proc/${pids[i]}/status") MiB, "; done
  echo "${out%, }"
}
# The leader's name (k1-k3).
leader_name() {
  local i st
  for i in 1 2 3; do
    st=$("$ctl" --endpoints "http://127.0.0.$i:24790" endpoint status -w json)
    [ "$(jq -r '.[0].Status.leader' <<<"$st")" = "$(jq -r '.[0].Status.header.member_id' <<<"$st")" ] && { echo "k$i"; return; }
  done
}

biglist() {
  build_apiserver
  if [ ! -x "$keel" ]; then (cd "$root" && cargo build --release --bin keel); fi
  local ref
  ref=$("$root/scripts/etcd-ref.sh" v3.7.3)
  ctl=$ref/etcdctl
  trap stop_all EXIT
  local kind bin label out t names secs
  for kind in keel etcd; do
    bin=$keel label=Keel
    [ "$kind" = etcd ] && bin=$ref/etcd label="etcd 3.7.3"
    stop_all
    rm -rf "$work"
    mkdir -p "$work"
    start_keel "$bin"
    # kube-apiserver's default compaction interval (5m): with the checks' 10 s, a paged list of
    # 100 pages outlives its first page's revision and gets 410 Expired, on etcd as on Keel.
    store=$label compaction_interval=5m start_apiserver
    k -o /dev/null -H 'Content-Type: application/json' -X POST "$api/api/v1/namespaces" \
      -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"keel"}}'
    t=$(date +%s)
    load_big "http://127.0.0.1:24790" "$big_n"
    ok "$label: $big_n configmaps of 1 KiB written in $(($(date +%s) - t)) s; leader $(leader_name); members' peak resident memory so far: $(peaks)"
    # Unpaginated: one LIST, streamed from the store.
    reset_peaks
    out=$(k -o "$work/big.json" -w '%{http_code} %{time_total}' "$api/api/v1/namespaces/keel/configmaps")
    [ "${out%% *}" = 200 ] || fail "$label: LIST of $big_n configmaps: HTTP ${out%% *}"
    names=$(grep -oE '"name": ?"big-[0-9]+"' "$work/big.json" | sort -u | wc -l)
    [ "$names" = "$big_n" ] || fail "$label: LIST returned $names distinct configmaps, want $big_n"
    ok "$label: unpaginated LIST of $big_n configmaps in ${out#* } s ($(du -m "$work/big.json" | cut -f1) MB); members' peak resident memory during it: $(peaks)"
    rm -f "$work/big.json"
    # Again, with the caches warm: what a LIST costs beyond them (peaks since before the first).
    out=$(k -o /dev/null -w '%{http_code} %{time_total}' "$api/api/v1/namespaces/keel/configmaps")
    [ "${out%% *}" = 200 ] || fail "$label: second LIST: HTTP ${out%% *}"
    ok "$label: the LIST again in ${out#* } s; members' peak resident memory over both: $(peaks)"
    # Paginated: limit 1000.
    reset_peaks
    t=$(date +%s.%N)
    names=$(list_paged configmaps 1000 | sort -u | wc -l)
    secs=$(echo "$(date +%s.%N) - $t" | bc)
    [ "$names" = "$big_n" ] || fail "$label: paginated LIST returned $names distinct configmaps, want $big_n"
    ok "$label: paginated LIST (limit 1000, $((big_n / 1000)) pages) in $secs s; members' peak resident memory during it: $(peaks)"
    local streamed
    streamed=$(k "$api/metrics" | awk '/^apiserver_storage_list_duration_seconds_count\{/ && /resource="configmaps"/ && /streamed="true"/ { s += $2 } END { print s + 0 }')
    [ "$streamed" -ge 2 ] || fail "$label: lists of configmaps streamed: $streamed (RangeStream not in use)"
    ok "$label: $streamed lists of configmaps served by RangeStream"
  done
  echo "kube: $passed checks passed (kube-apiserver $kver; $big_n configmaps listed on Keel and on etcd 3.7.3)"
}

main "$@"
