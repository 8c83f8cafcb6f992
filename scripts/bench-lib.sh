# Helpers shared by the benchmark scripts (sourced, not run): bench-compare.sh, bench-scale.sh.

# Resident memory of process PID, in KiB (0 once it is gone).
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Leader changes seen, summed over the members of $eps (comma-separated client endpoints), from
# etcd's `etcd_server_leader_changes_seen_total` on each member's /metrics.
leader_changes() {
  local t=0 e v
  for e in ${eps//,/ }; do
    v=$(curl -sf "http://$e/metrics" | awk '/^etcd_server_leader_changes_seen_total/ {s += $2} END {print s + 0}' || true)
    t=$(( t + ${v:-0} ))
  done
  echo "$t"
}
