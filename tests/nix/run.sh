#!/usr/bin/env bash
# Nix checks that work without a binary cache (README.md in this directory):
#   - every .nix file parses; flake.lock pins the revisions of ../shared/nix/pins.json;
#   - the flake's own outputs evaluate against nixpkgs' real lib, the real systemd.services types
#     and unit renderer, and typed stand-ins (tests/nix/eval.nix, one run per check);
#   - the nixosTests' Python test scripts compile; a rendered readiness gate gives up on a hung
#     daemon instead of hanging; the workflows run only apps the flake has, from flake.lock.
# Needs nix-instantiate (apt-get install nix-bin) and ../shared/nix (or ZTNA_SHARED_NIX); without
# either it fails, saying why. Prints each check and a final "nix: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
shared=${ZTNA_SHARED_NIX:-$repo/../shared/nix}
passed=0 failed=0
pass() { echo "ok   $1${2:+: $2}"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
finish() { echo "nix: $passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit; }

if ! command -v nix-instantiate >/dev/null 2>&1; then
  fail "nix-instantiate not installed (apt-get install nix-bin): the Nix checks cannot run"
  finish
fi
if [ ! -f "$shared/nixpkgs-lib/lib/default.nix" ] || [ ! -f "$shared/nixos-subset/systemd-subset.nix" ]; then
  fail "no nixpkgs lib / NixOS subset at $shared (the shared/ folder beside the repository, or ZTNA_SHARED_NIX)"
  finish
fi

# Nix run as root defaults to build-users-group = nixbld and warns on every call when that group
# does not exist (a bare `apt-get install nix-bin`); these checks only evaluate, so no build users.
getent group nixbld >/dev/null || export NIX_CONFIG="${NIX_CONFIG:+$NIX_CONFIG
}build-users-group ="
n=0
for f in $(git ls-files '*.nix'); do
  if nix-instantiate --parse "$f" >/dev/null; then n=$((n + 1)); else fail "nix parse: $f"; fi
done
pass "nix parse" "$n files"

if out=$(python3 - "$shared/pins.json" flake.lock <<'PY' 2>&1
import json, sys
pins, lock = (json.load(open(p)) for p in sys.argv[1:3])
names = {"nixpkgs": "nixpkgs", "crane": "crane", "deploy-rs": "deploy-rs", "advisory-db": "advisory-db",
         "flake-utils": "utils", "flake-compat": "flake-compat", "systems": "systems"}
bad = []
for pin, node in names.items():
    got = lock["nodes"].get(node, {}).get("locked", {})
    want = pins[pin]["locked"]
    for k in ("rev", "narHash"):
        if got.get(k) != want.get(k):
            bad.append(f"{node}.{k}: {got.get(k)} != {want.get(k)}")
if bad:
    sys.exit("; ".join(bad))
print(", ".join(f"{p} {pins[p]['locked']['rev'][:12]}" for p in ("nixpkgs", "crane", "deploy-rs")))
PY
); then pass "flake.lock pins the revisions of shared/nix/pins.json" "$out"; else fail "flake.lock pins" "$out"; fi

# ev prints the JSON result on stdout only; Nix's messages go to $evlog, shown when it fails.
evlog=$(mktemp)
trap 'rm -f "$evlog"' EXIT
ev() {
  if nix-instantiate --read-write-mode --eval --strict --json tests/nix/eval.nix --arg shared "$shared" "$@" 2>"$evlog"; then
    return 0
  fi
  tail -5 "$evlog"
  return 1
}
if ! names=$(ev -A names); then
  fail "tests/nix/eval.nix does not evaluate" "$names"
  finish
fi
for c in $(echo "$names" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)))'); do
  if out=$(ev -A "checks.$c"); then
    pass "eval $c" "$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin))')"
  else
    fail "eval $c" "$(echo "$out" | grep -v '^ *[0-9]*|' | grep -v '^\s*$' | tail -8)"
  fi
done

# The nixosTests' scripts, as evaluated, are valid Python.
if scripts=$(ev -A testScripts); then
  out=$(python3 - "$scripts" <<'PY' 2>&1
import json, sys
for name, text in json.loads(sys.argv[1]).items():
    compile(text, name, "exec")
    print(name, end=" ")
PY
  ) && pass "nixosTest scripts compile" "$out" || fail "nixosTest scripts compile" "$out"
else
  fail "nixosTest scripts" "$(echo "$scripts" | tail -5)"
fi

# A readiness gate as rendered for a deployed host, run against a daemon that accepts the
# connection and never answers: each probe must give up (curl --max-time), so the gate keeps
# probing and fails at its deadline instead of holding the activation forever. And against one that
# answers 200 it passes at once.
if command -v curl >/dev/null && gates=$(ev -A readyGates); then
  out=$(python3 - "$gates" <<'PY' 2>&1
import json, re, socket, subprocess, sys, threading, time
gates = json.loads(sys.argv[1])
name, script = next((k, v) for k, v in sorted(gates.items()) if "intermediate" in k)
def serve(answer):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
    conns = []
    def loop():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            conns.append(c)
            if answer:
                c.recv(4096); c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"); c.close()
    threading.Thread(target=loop, daemon=True).start()
    return s, conns
def run(port, seconds):
    text = re.sub(r"/nix/store/[0-9a-z]{32}-curl-[^/]*/bin/curl", "curl", script)
    text = re.sub(r"http://[0-9.]+:[0-9]+/readyz", f"http://127.0.0.1:{port}/readyz", text)
    p = subprocess.Popen(["bash", "-c", text], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait(); return None
hung, conns = serve(False)
run(hung.getsockname()[1], 9)
probes = len(conns); hung.close()
good, _ = serve(True)
t = time.time(); rc = run(good.getsockname()[1], 10); took = time.time() - t
if probes < 3 or rc != 0:
    sys.exit(f"{name}: {probes} probe(s) in 9 s against a hung endpoint (a probe without a time limit never returns); ready endpoint: exit {rc}")
print(f"{name}: {probes} bounded probes in 9 s against a hung /readyz (it gives up at its 60 s deadline); passes in {took:.1f} s when ready")
PY
  ) && pass "readiness gate gives up on a hung daemon" "$out" || fail "readiness gate" "$out"
else
  fail "readiness gate" "curl missing or gates did not evaluate: $(echo "${gates:-}" | tail -3)"
fi

# Workflows: every `nix run` is an app of this flake or takes nixpkgs from flake.lock.
if apps=$(ev -A apps); then
  out=$(python3 - "$apps" .github/workflows/*.yml <<'PY' 2>&1
import json, re, sys
apps = set(json.loads(sys.argv[1])["x86_64-linux"])
bad, seen = [], []
for f in sys.argv[2:]:
    for line in open(f):
        for m in re.finditer(r"nix run ([^\n]*)", line):
            cmd = m.group(1)
            ref = re.search(r"(\S*)#([\w.-]+)", cmd)
            if not ref:
                bad.append(f"{f}: {cmd}"); continue
            flake, attr = ref.groups()
            if flake == "." and attr in apps:
                seen.append(f".#{attr}")
            elif "--inputs-from ." in cmd:
                seen.append(f"{flake}#{attr} (flake.lock)")
            else:
                bad.append(f"{f}: nix run {cmd} (not pinned by flake.lock)")
if bad:
    sys.exit("; ".join(bad))
print(", ".join(sorted(set(seen))))
PY
  ) && pass "workflows run pinned tools" "$out" || fail "workflows run pinned tools" "$out"
else
  fail "apps" "$(echo "$apps" | tail -3)"
fi

finish
