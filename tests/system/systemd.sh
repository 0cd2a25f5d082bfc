#!/usr/bin/env bash
# The rendered units under real systemd: boots a Debian rootfs with `systemd-nspawn -b`, installs
# the release binaries and the units and config files of the flake's nixosModules as evaluated by
# tests/nix/eval.nix (real systemd types and unit renderer; tests/system/render-units), and checks
# readiness, traffic, limits, hardening exposure, reload, drain on stop, the watchdog, and an
# intermediate on the privileged UDP port 443. Needs root.
# Prints each case and a final "N passed, N failed". Cleans up even when a case fails.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
ROOTFS=${ZTNA_ROOTFS:-/var/cache/ztna-rootfs/bookworm}
WORK=$(mktemp -d /tmp/ztna-systemd.XXXXXX)
MACHINE=ztna-systemd-test
MAX_EXPOSURE=1.5
passed=0 failed=0 nspawn_pid="" leader="" backends_pid=""

skip() { echo "SKIP systemd suite: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root"
command -v systemd-nspawn >/dev/null || skip "systemd-nspawn missing (apt-get install systemd-container)"
command -v nix-instantiate >/dev/null || skip "nix-instantiate missing (apt-get install nix-bin), needed to render the units"
shared=${ZTNA_SHARED_NIX:-$repo/../shared/nix}
if [ ! -d "$shared/nixpkgs-lib" ]; then
  echo "FAIL systemd suite: no nixpkgs lib at $shared (shared/ beside the repository): the units cannot be rendered"
  echo "systemd: 0 passed, 1 failed"; exit 1
fi

log() { printf '[%4ss] %s\n' "$SECONDS" "$*"; }
in_ct() { nsenter -t "$leader" -a "$@"; }
H() { python3 "$here/helpers.py" "$@"; }

dump_logs() {
  [ -n "$leader" ] || return 0
  for u in ztna-intermediate ztna-connector ztna-agent; do
    log "--- last 15 journal lines of $u ---"
    in_ct journalctl -b -u "$u" --no-pager -n 15 2>/dev/null || true
  done
}
case_ok() { log "PASS $1${2:+: $2}"; passed=$((passed + 1)); }
case_fail() { log "FAIL $1${2:+: $2}"; failed=$((failed + 1)); dump_logs; }

cleanup() {
  if [ -n "$leader" ]; then in_ct systemctl poweroff >/dev/null 2>&1 || true; fi
  if [ -n "$nspawn_pid" ]; then
    for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$nspawn_pid" 2>/dev/null || true
  fi
  [ -n "$backends_pid" ] && kill "$backends_pid" 2>/dev/null
  touch "$WORK/go1" "$WORK/go2" "$WORK/go3" "$WORK/stopload" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- rootfs (cached between runs) ---------------------------------------------------------------
if [ ! -x "$ROOTFS/lib/systemd/systemd" ]; then
  command -v debootstrap >/dev/null || skip "debootstrap missing (apt-get install debootstrap)"
  log "creating Debian rootfs in $ROOTFS (cached for later runs)"
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates \
    bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; skip "debootstrap failed (no Debian mirror reachable?)"; }
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

# --- binaries, PKI, configs, units -------------------------------------------------------------
log "building release binaries"
export CARGO_TERM_PROGRESS_WHEN=never
(cd "$repo" && cargo build --release -q -p ztna-intermediate -p ztna-connector -p ztna-agent -p ztna-pki) || { echo "build failed"; exit 1; }
install -m 0755 "$repo"/target/release/ztna-{intermediate,connector,agent} "$ROOTFS/usr/local/bin/"
pki="$repo/target/release/ztna-pki"
rm -rf "$ROOTFS/etc/ztna"; mkdir -p "$ROOTFS/etc/ztna/creds"
"$pki" init --out "$WORK/pki" --trust-domain systemd.test >/dev/null
issue() { # role name days
  "$pki" issue --ca "$WORK/pki" --role "$1" --name "$2" --out "$WORK/pki" --days "${3:-30}" --force >/dev/null
  mkdir -p "$ROOTFS/etc/ztna/creds/$1"
  install -m 0600 "$WORK/pki/ca.pem" "$ROOTFS/etc/ztna/creds/$1/ca.pem"
  install -m 0600 "$WORK/pki/$2.pem" "$ROOTFS/etc/ztna/creds/$1/cert.pem"
  install -m 0600 "$WORK/pki/$2.key" "$ROOTFS/etc/ztna/creds/$1/key.pem"
}
issue intermediate relay; issue connector web-1; issue agent alice
rm -f "$ROOTFS"/etc/systemd/system/ztna-*.service
rm -rf "$ROOTFS/nix"

# Units and configs from the evaluation of the flake's modules, for an intermediate on $1; then
# what the system build does with each config (system.checks): --check-config --config-only.
render() {
  "$here/render-units" "$ROOTFS" "$1" >"$WORK/rendered" 2>&1 || { cat "$WORK/rendered"; echo "render-units failed"; exit 1; }
  config_errors=""
  for role in intermediate connector agent; do
    conf=$(grep -o -- '--config [^ ]*' "$ROOTFS/etc/systemd/system/ztna-$role.service" | cut -d' ' -f2)
    msg=$("$repo/target/release/ztna-$role" --config "$ROOTFS$conf" --check-config --config-only 2>&1) \
      || config_errors="$config_errors $role: $msg;"
  done
}
render 127.0.0.1:24433
if [ -z "$config_errors" ]; then
  case_ok "rendered configs pass --check-config" "$(grep -c '\.toml$' "$WORK/rendered") files from tests/nix/eval.nix (systemdSuite)"
else
  case_fail "rendered configs pass --check-config" "$config_errors"
fi

# --- boot ----------------------------------------------------------------------------------------
# Background helpers must not hold the caller's stdout (run.sh captures it) and must be the
# direct children we kill on exit.
python3 "$here/helpers.py" backends 27000 27001 >"$WORK/backends.log" 2>&1 &
backends_pid=$!
log "booting $ROOTFS with systemd-nspawn"
systemd-nspawn -q -D "$ROOTFS" -b -M "$MACHINE" --register=no --keep-unit >"$WORK/nspawn.log" 2>&1 &
nspawn_pid=$!
# The container's init is nspawn's child named systemd (nspawn may run a short-lived helper child
# first, whose namespaces vanish with it).
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn_pid" -x systemd | head -1)
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { cat "$WORK/nspawn.log"; echo "FAIL boot: no container"; exit 1; }
for _ in $(seq 150); do
  state=$(in_ct systemctl is-system-running 2>/dev/null)
  case "$state" in running|degraded) break ;; esac
  sleep 0.2
done
log "container systemd: ${state:-unknown} (systemd $(in_ct systemctl --version | head -1 | awk '{print $2}'))"

show() { in_ct systemctl show "$1" -p "$2" --value; }

# --- 1. units become active only after READY=1, with their status line ----------------------------
t0=$(date +%s%N)
in_ct systemctl start ztna-intermediate ztna-connector ztna-agent
t1=$(date +%s%N)
ok=1; detail=""
for u in ztna-intermediate ztna-connector ztna-agent; do
  st=$(show "$u" ActiveState) status=$(show "$u" StatusText)
  started=$(show "$u" ExecMainStartTimestampMonotonic) active=$(show "$u" ActiveEnterTimestampMonotonic)
  detail="$detail $u=$st ('$status')"
  [ "$st" = active ] && [ -n "$status" ] && [ "$status" != "starting" ] && [ "$active" -ge "$started" ] || ok=0
done
[ $ok = 1 ] && case_ok "notify units active after READY=1 with STATUS" "$detail; start took $(( (t1 - t0) / 1000000 )) ms" \
  || case_fail "notify units active after READY=1" "$detail"

# --- 1b. the limits the units set reach the processes --------------------------------------------
# systemd cannot raise a limit above its own hard limit: where the container's init holds less
# than 65536 (a sandbox), the units get that much, still far above the default soft limit 1024.
init_max=$(in_ct awk '/^Max open files/ {print $5}' /proc/1/limits)
want=$(( init_max < 65536 ? init_max : 65536 ))
ok=1; detail=""
for u in ztna-intermediate ztna-connector ztna-agent; do
  pid=$(show "$u" MainPID)
  nofile=$(in_ct awk '/^Max open files/ {print $4}' "/proc/$pid/limits" 2>/dev/null)
  tss=$(show "$u" TimeoutStopUSec)
  detail="$detail $u: open files $nofile, TimeoutStopSec $tss;"
  [ "${nofile:-0}" = "$want" ] && [ "$want" -gt 1024 ] && [ "$tss" = 20s ] || ok=0
done
[ $ok = 1 ] && case_ok "LimitNOFILE and TimeoutStopSec = drain + 15 on all three" "$detail (LimitNOFILE=65536, capped at the container init's $init_max)" \
  || case_fail "LimitNOFILE and TimeoutStopSec = drain + 15 on all three" "$detail want open files $want (LimitNOFILE=65536, container init max $init_max)"

# --- 2. traffic with all hardening on --------------------------------------------------------------
for _ in $(seq 50); do H get 29471 /readyz >/dev/null && H get 29472 /readyz >/dev/null && break; sleep 0.2; done
if H tcp 28080 && H udp 28081; then
  case_ok "TCP and UDP through the agent's local ports" "$(H get 29471 /readyz)"
else
  case_fail "TCP and UDP through the agent's local ports"
fi

# --- 3. systemd-analyze security exposure ----------------------------------------------------------
ok=1; detail=""
for u in ztna-intermediate ztna-connector ztna-agent; do
  exp=$(in_ct systemd-analyze security "$u.service" --no-pager 2>/dev/null | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
  detail="$detail $u=$exp"
  awk -v e="${exp:-99}" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' || ok=0
done
[ $ok = 1 ] && case_ok "systemd-analyze security exposure <= $MAX_EXPOSURE" "$detail" \
  || { case_fail "systemd-analyze security exposure <= $MAX_EXPOSURE" "$detail"; in_ct systemd-analyze security ztna-intermediate.service --no-pager | grep -v '✓' | head -30; }

# --- 4. reload with re-issued certificates keeps a live flow ---------------------------------------
python3 "$here/helpers.py" hold 28080 "$WORK/go1" "$WORK/hold1" >>"$WORK/helpers.log" 2>&1 &
hold_pid=$!
for _ in $(seq 100); do [ -f "$WORK/hold1.open" ] && break; sleep 0.05; done
before=$(H metric 29470 ztna_tls_cert_expiry_timestamp_seconds)
issue intermediate relay 90
# Journal lines from now on only (the cached rootfs keeps earlier runs' journals).
since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
in_ct systemctl reload ztna-intermediate
sleep 1
reloaded=$(in_ct journalctl -u ztna-intermediate --no-pager --since "$since" | grep -c "configuration reloaded")
touch "$WORK/go1"; wait $hold_pid
after_reload=$(H metric 29470 ztna_tls_cert_expiry_timestamp_seconds)
if [ "$(cat "$WORK/hold1" 2>/dev/null)" = ok ] && [ "$reloaded" -ge 1 ] && [ "$(show ztna-intermediate NRestarts)" = 0 ]; then
  case_ok "systemctl reload keeps a live flow" "flow intact, reload logged, no restart; cert expiry $before -> $after_reload"
else
  case_fail "systemctl reload keeps a live flow" "hold=$(cat "$WORK/hold1" 2>/dev/null) reloaded=$reloaded"
fi
if [ "$before" != "$after_reload" ] && [ -n "$after_reload" ]; then
  case_ok "reload applied the re-issued certificate" "intermediate: $before -> $after_reload (copied from /etc/ztna/creds by the unit's ExecReload)"
else
  case_fail "reload applied the re-issued certificate" "intermediate expiry $before -> $after_reload"
fi

# --- 4b. a connector reloaded with a re-issued certificate renews its connection in place --------
python3 "$here/helpers.py" hold 28080 "$WORK/go3" "$WORK/hold3" >>"$WORK/helpers.log" 2>&1 &
hold3_pid=$!
for _ in $(seq 100); do [ -f "$WORK/hold3.open" ] && break; sleep 0.05; done
c_before=$(H metric 29471 ztna_tls_cert_expiry_timestamp_seconds)
hs_before=$(H metric 29470 ztna_intermediate_handshakes_total 'result="ok"')
rn_before=$(H metric 29470 ztna_intermediate_renewals_total 'result="accepted"')
issue connector web-1 60
since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
in_ct systemctl reload ztna-connector
# The intermediate accepted the renewal of the connector's connection: one more renewal, no new
# handshake, still one connector connection. Read from the intermediate's metrics: journald may
# lag on a loaded machine.
renewed=0
for _ in $(seq 100); do
  rn=$(H metric 29470 ztna_intermediate_renewals_total 'result="accepted"')
  awk -v a="${rn:-0}" -v b="${rn_before:-0}" 'BEGIN { exit !(a > b) }' && renewed=1 && break
  sleep 0.1
done
hs=$(H metric 29470 ztna_intermediate_handshakes_total 'result="ok"')
conns=$(H metric 29470 ztna_intermediate_connections 'role="connector"')
new_flow=0; H tcp 28080 && new_flow=1
touch "$WORK/go3"; wait $hold3_pid
c_after=$(H metric 29471 ztna_tls_cert_expiry_timestamp_seconds)
if [ "$(cat "$WORK/hold3" 2>/dev/null)" = ok ] && [ $renewed = 1 ] && [ "$hs" = "$hs_before" ] \
  && [ "${conns%.*}" = 1 ] && [ $new_flow = 1 ] \
  && [ -n "$c_after" ] && [ "$c_before" != "$c_after" ] && [ "$(show ztna-connector NRestarts)" = 0 ]; then
  case_ok "connector reload renews its connection to a re-issued certificate" "expiry $c_before -> $c_after, renewals $rn_before -> $rn, no new handshake, one connection, the held flow intact, a new flow works, no restart"
else
  case_fail "connector reload renews its connection to a re-issued certificate" "hold=$(cat "$WORK/hold3" 2>/dev/null) renewed=$renewed (renewals $rn_before -> $rn, handshakes $hs_before -> $hs, connector connections $conns) new_flow=$new_flow expiry $c_before -> $c_after; connector journal since the reload: $(in_ct journalctl -u ztna-connector --no-pager --since "$since" | tail -8)"
fi

# --- 4c. the copies: root's, readable by the service only; a reload with a missing file changes
# nothing ------------------------------------------------------------------------------------------
dir_perm=$(in_ct stat -c '%U %a' /run/ztna-tls/connector 2>&1)
key_perm=$(in_ct stat -c '%U %a' /run/ztna-tls/connector/key.pem 2>&1)
svc_gid=$(in_ct stat -c '%g' /run/ztna-connector 2>&1)
dir_gid=$(in_ct stat -c '%g' /run/ztna-tls/connector 2>&1)
cert_sum=$(in_ct sha256sum /run/ztna-tls/connector/cert.pem | cut -d' ' -f1)
# A re-issued certificate whose key file is missing (a renewal hook that died half-way).
cp -a "$ROOTFS/etc/ztna/creds/connector" "$WORK/creds-connector"
issue connector web-1 45
rm "$ROOTFS/etc/ztna/creds/connector/key.pem"
if in_ct systemctl reload ztna-connector 2>/dev/null; then reload_rc=0; else reload_rc=1; fi
cert_sum_after=$(in_ct sha256sum /run/ztna-tls/connector/cert.pem | cut -d' ' -f1)
# Back to the files in use (a consistent set) for the cases below.
rm -rf "$ROOTFS/etc/ztna/creds/connector"; cp -a "$WORK/creds-connector" "$ROOTFS/etc/ztna/creds/connector"
state=$(show ztna-connector ActiveState)
if [ "$dir_perm" = "root 750" ] && [ "$key_perm" = "root 440" ] && [ "$svc_gid" = "$dir_gid" ] \
  && [ $reload_rc = 1 ] && [ "$cert_sum" = "$cert_sum_after" ] && [ "$state" = active ] && H tcp 28080; then
  case_ok "TLS copies root's and group-readable only; a reload missing a file changes nothing" "dir $dir_perm (group = the service's $svc_gid), key $key_perm; reload without key.pem failed, copies unchanged, connector $state"
else
  case_fail "TLS copies root's and group-readable only; a reload missing a file changes nothing" "dir '$dir_perm' gid $dir_gid (service $svc_gid), key '$key_perm', reload rc $reload_rc, cert $cert_sum -> $cert_sum_after, state $state"
fi

# --- 5. systemctl stop drains under load and exits 0 within TimeoutStopSec ---------------------------
# Wait until flows work end to end.
for _ in $(seq 100); do H tcp 28080 && break; sleep 0.1; done
python3 "$here/helpers.py" load 28080 "$WORK/stopload" "$WORK/load" >>"$WORK/helpers.log" 2>&1 &
load_pid=$!
python3 "$here/helpers.py" hold 28080 "$WORK/go2" "$WORK/hold2" >>"$WORK/helpers.log" 2>&1 &
hold2_pid=$!
for _ in $(seq 100); do [ -f "$WORK/hold2.open" ] && break; sleep 0.05; done
sleep 1
timeout_stop=$(show ztna-intermediate TimeoutStopUSec)
t0=$(date +%s%N)
in_ct systemctl stop ztna-intermediate
t1=$(date +%s%N)
touch "$WORK/stopload" "$WORK/go2"; wait $load_pid $hold2_pid 2>/dev/null
stop_ms=$(( (t1 - t0) / 1000000 ))
result=$(show ztna-intermediate Result) status=$(show ztna-intermediate ExecMainStatus)
attempts=$(cut -d' ' -f1 "$WORK/load" 2>/dev/null || echo 0)
if [ "$result" = success ] && [ "$status" = 0 ] && [ "$stop_ms" -lt 20000 ] && [ -f "$WORK/hold2.open" ] && [ "${attempts:-0}" -ge 10 ]; then
  case_ok "systemctl stop drains and exits 0" "stop took $stop_ms ms under load with a held flow (drain_timeout 5 s, TimeoutStopSec $timeout_stop); load: $(cat "$WORK/load") (attempts failures)"
else
  case_fail "systemctl stop drains and exits 0" "Result=$result ExecMainStatus=$status after $stop_ms ms; held flow open: $([ -f "$WORK/hold2.open" ] && echo yes || echo no); load: $(cat "$WORK/load" 2>/dev/null)"
fi

# --- 6. a stopped (hung) process stops petting the watchdog and is restarted ------------------------
in_ct systemctl start ztna-intermediate
pid=$(show ztna-intermediate MainPID) restarts0=$(show ztna-intermediate NRestarts)
t0=$(date +%s%N)
in_ct kill -STOP "$pid"
newpid=$pid
for _ in $(seq 200); do
  newpid=$(show ztna-intermediate MainPID)
  [ "$newpid" != "$pid" ] && [ "$newpid" != 0 ] && [ "$(show ztna-intermediate ActiveState)" = active ] && break
  sleep 0.1
done
t1=$(date +%s%N)
restarts=$(show ztna-intermediate NRestarts)
if [ "$newpid" != "$pid" ] && [ "$restarts" -gt "$restarts0" ]; then
  case_ok "watchdog restarts a hung daemon" "SIGSTOP pid $pid -> restarted as $newpid after $(( (t1 - t0) / 1000000 )) ms (WatchdogSec 3), NRestarts $restarts0 -> $restarts; $(in_ct journalctl -u ztna-intermediate --no-pager | grep -o 'Watchdog timeout[^)]*)' | tail -1)"
else
  case_fail "watchdog restarts a hung daemon" "pid $pid -> $newpid, NRestarts $restarts0 -> $restarts"
fi
# Connector and agent reconnect with their backoff (it grew while the relay was stopped in the
# previous case and hung in this one): bounded by an attempt's handshake timeout plus the 3 s cap.
t0=$SECONDS; recovered=0
while [ $((SECONDS - t0)) -lt 60 ]; do
  if H get 29472 /readyz >/dev/null && H tcp 28080; then recovered=1; break; fi
  sleep 0.2
done
[ $recovered = 1 ] && case_ok "traffic flows again after the watchdog restart" "after $((SECONDS - t0)) s more (reconnect backoff grown while the relay was stopped and hung, capped at 3 s)" \
  || case_fail "traffic flows again after the watchdog restart" "agent: $(H get 29472 /readyz)"

# --- 7. the intermediate on UDP 443 (a privileged port), an agent connecting through it ------------
# The same flake modules with listen = 127.0.0.1:443: the unit keeps CAP_NET_BIND_SERVICE and so
# runs without PrivateUsers (with it, bind() fails with EACCES and the unit restart-loops).
in_ct systemctl stop ztna-agent ztna-connector ztna-intermediate
render 127.0.0.1:443
[ -z "$config_errors" ] || case_fail "port 443 configs pass --check-config" "$config_errors"
in_ct systemctl daemon-reload
in_ct systemctl reset-failed ztna-intermediate ztna-connector ztna-agent 2>/dev/null
t0=$SECONDS
in_ct systemctl start ztna-intermediate ztna-connector ztna-agent 2>"$WORK/start443.err"
up=0
for _ in $(seq 100); do
  if H get 29472 /readyz >/dev/null && H tcp 28080 && H udp 28081; then up=1; break; fi
  sleep 0.2
done
bound=$(in_ct ss -Hulpn 'sport = :443' 2>/dev/null | grep -o 'ztna-intermedia[a-z]*' | head -1)
caps=$(show ztna-intermediate AmbientCapabilities) privusers=$(show ztna-intermediate PrivateUsers)
exp443=$(in_ct systemd-analyze security ztna-intermediate.service --no-pager 2>/dev/null | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | awk '{print $NF}')
unpriv=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)
if [ $up = 1 ] && [ -n "$bound" ] && [ "$(show ztna-intermediate NRestarts)" = 0 ] && [ "$unpriv" -gt 443 ] \
   && awk -v e="${exp443:-99}" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
  case_ok "intermediate on UDP 443, agent connects through it" "udp 127.0.0.1:443 held by $bound (ip_unprivileged_port_start=$unpriv), AmbientCapabilities=$caps PrivateUsers=$privusers, TCP and UDP through the agent after $((SECONDS - t0)) s; exposure $exp443"
else
  case_fail "intermediate on UDP 443, agent connects through it" "ready=$up bound='$bound' NRestarts=$(show ztna-intermediate NRestarts) ActiveState=$(show ztna-intermediate ActiveState) PrivateUsers=$privusers caps='$caps' exposure=$exp443 ip_unprivileged_port_start=$unpriv; $(cat "$WORK/start443.err"); $(in_ct journalctl -u ztna-intermediate --no-pager -n 5 | grep -i -m2 'denied\|error')"
fi

echo
echo "systemd: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
