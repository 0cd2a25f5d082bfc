#!/usr/bin/env bash
# System suites (need root): the product across network-namespace hosts (netns.py), direct (P2P)
# paths through a matrix of Linux NATs in namespaces (p2p.py), issue 12's attacks by the hostile
# test client against the daemons as processes (hostile.py), and the rendered units under real
# systemd in a systemd-nspawn container (systemd.sh).
# Installs what it lacks with apt-get. Prints each case and a final "N passed, N failed".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "SKIP system suites: need root"
  exit 0
fi
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v nsenter >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v nft >/dev/null || need+=(nftables)
command -v ss >/dev/null || need+=(iproute2)
# Real, unmodified clients and servers for the namespace suite.
command -v dnsmasq >/dev/null || need+=(dnsmasq)
command -v dig >/dev/null || need+=(dnsutils)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v sshd >/dev/null || need+=(openssh-server)
command -v scp >/dev/null || need+=(openssh-client)
# The P2P matrix flushes the NATs' conntrack tables between cases and prints them as evidence.
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || echo "apt-get install failed"
fi
total_pass=0 total_fail=0
run_suite() {
  local name=$1; shift
  echo "=== suite: $name ==="
  local out rc log
  log=$(mktemp)
  # Bounded, and streamed as it runs; a suite that hangs is stopped and counted as failed.
  timeout 1800 "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  out=$(cat "$log"); rm -f "$log"
  local p f
  p=$(echo "$out" | grep -Eo '^[a-z0-9]+: [0-9]+ passed' | tail -1 | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+' || echo 0)
  f=$(echo "$out" | grep -Eo '[0-9]+ failed' | tail -1 | grep -Eo '[0-9]+' || echo 0)
  if [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then f=1; fi
  total_pass=$((total_pass + ${p:-0})); total_fail=$((total_fail + ${f:-0}))
}
run_suite netns python3 "$here/netns.py"
run_suite p2p python3 "$here/p2p.py"
run_suite hostile python3 "$here/hostile.py"
run_suite systemd "$here/systemd.sh"
echo
echo "system: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
