#!/usr/bin/env python3
"""Runs the documented procedures verbatim and fails when a documented command fails.

Extracted from the Markdown (never copied here):
  - README.md, section "A real deployment": the first ```sh block;
  - docs/operations.md, sections "Certificate rotation", "Adding a connector" and "CA rotation":
    the first ```sh block of each.
The blocks run in that order in one scratch directory on loopback (in a private network
namespace when run as root, so the documented ports cannot collide with anything), with the
built binaries on PATH and `examples/` reachable as in a checkout. A line that starts a daemon
(`ztna-intermediate|ztna-connector|ztna-agent --config ...` without --check-config or a
subcommand) is started in the background and must become ready (/readyz 200); every other line
must exit 0. A `status` line asks the daemon of that role started last (its ops port is passed
as ZTNA_OPS_LISTEN, as the daemon got it), so it exits 0 only when that daemon is ready.

The environment only points the daemons at loopback: the intermediate listens on
127.0.0.1:<port> (ZTNA_LISTEN), clients use it (ZTNA_INTERMEDIATES), and each daemon gets its
own ops port (ZTNA_OPS_LISTEN). `systemctl reload ztna-<role>` is served by a test double that
sends SIGHUP to the daemon started for that role (what the unit's ExecReload does).

After each block the runner checks what the procedure promises: bytes flow through the agent to
the example's backend; the rotated certificate is reloaded and flows still work; the new
connector is registered (two connectors for the service).

Usage: tests/docs/run.py [BIN_DIR]   (default target/debug; build with `cargo build --bins`)
Prints one line per step and a closing `docs: N passed, N failed`.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAEMONS = ("ztna-intermediate", "ztna-connector", "ztna-agent")


def in_own_netns():
    """Re-executes this script in a private network namespace when root (loopback only)."""
    if os.geteuid() != 0 or os.environ.get("ZTNA_DOCS_NETNS") or not shutil.which("unshare"):
        return
    env = dict(os.environ, ZTNA_DOCS_NETNS="1")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, *sys.argv]
    r = subprocess.run(cmd, env=env)
    if r.returncode in (0, 1):
        sys.exit(r.returncode)
    print(f"(could not enter a private network namespace, exit {r.returncode}; running here)")


def sh_block(md, heading):
    """The first ```sh block after the heading (a line containing `heading` that starts with #)."""
    text = open(os.path.join(ROOT, md)).read()
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("#") and heading in l), None)
    if start is None:
        raise SystemExit(f"{md}: no heading {heading!r}")
    i = start + 1
    while i < len(lines) and not lines[i].strip().startswith("```sh"):
        if lines[i].startswith("#") and not lines[i].startswith("#" * 4):
            raise SystemExit(f"{md}: section {heading!r} has no ```sh block")
        i += 1
    if i == len(lines):
        raise SystemExit(f"{md}: section {heading!r} has no ```sh block")
    block = []
    for l in lines[i + 1:]:
        if l.strip().startswith("```"):
            break
        block.append(l)
    return block


def commands(block):
    """Shell commands of a block: continuation lines joined, comment-only lines dropped."""
    out, cur = [], ""
    for l in block:
        s = l.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        out.append(cur + s)
        cur = ""
    return out


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def toml_value(path, key):
    m = re.search(rf'^{key}\s*=\s*"([^"]+)"', open(path).read(), re.M)
    if not m:
        raise SystemExit(f"{path}: no {key}")
    host, port = m.group(1).rsplit(":", 1)
    return host.strip("[]"), int(port)


def echo_backend(addr):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(addr)
    srv.listen(16)

    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)

    def accept():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def roundtrip(addr, msg):
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = s.recv(65536)
            if not d:
                return got
            got += d


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


class Runner:
    def __init__(self, bindir):
        self.work = tempfile.mkdtemp(prefix="ztna-docs.")
        self.state = os.path.join(self.work, ".state")
        os.makedirs(self.state)
        shim = os.path.join(self.state, "bin")
        os.makedirs(shim)
        with open(os.path.join(shim, "systemctl"), "w") as f:
            f.write('#!/bin/sh\n'
                    '# Test double: `systemctl reload UNIT` = SIGHUP to each daemon the docs runner\n'
                    '# started for UNIT (what the unit\'s ExecReload does on each host).\n'
                    'case "$1" in\n'
                    '  reload) for p in $(cat "$ZTNA_DOCS_STATE/$2.pids"); do kill -HUP "$p" || exit 1; done ;;\n'
                    '  *) echo "systemctl test double: only reload is supported" >&2; exit 1 ;;\n'
                    'esac\n')
        os.chmod(os.path.join(shim, "systemctl"), 0o755)
        os.symlink(os.path.join(ROOT, "examples"), os.path.join(self.work, "examples"))
        self.relay_port = free_port(socket.SOCK_DGRAM)
        self.env = dict(os.environ, PATH=f"{bindir}:{shim}:{os.environ['PATH']}",
                        ZTNA_DOCS_STATE=self.state, RUST_LOG="info")
        for k in list(self.env):
            if k.startswith("ZTNA_") and k not in ("ZTNA_DOCS_STATE", "ZTNA_DOCS_NETNS"):
                del self.env[k]
        self.procs = []  # (unit, popen, ops port, log path)
        self.passed = 0
        self.failed = 0

    def result(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok      {what}")
        else:
            self.failed += 1
            print(f"FAILED  {what}\n{detail}")
        return ok

    def daemon_env(self, unit):
        ops = free_port()
        env = dict(self.env, ZTNA_OPS_LISTEN=f"127.0.0.1:{ops}")
        if unit == "ztna-intermediate":
            env["ZTNA_LISTEN"] = f"127.0.0.1:{self.relay_port}"
        else:
            env["ZTNA_INTERMEDIATES"] = f"127.0.0.1:{self.relay_port}"
        return env, ops

    def run_block(self, where, block):
        ok = True
        for line in commands(block):
            words = line.split()
            unit = words[0] if words else ""
            if unit in DAEMONS and "status" in line.split(" #")[0].split()[1:]:
                ops = next((o for u, _, o, _ in reversed(self.procs) if u == unit), None)
                env = dict(self.env, ZTNA_OPS_LISTEN=f"127.0.0.1:{ops}") if ops else self.env
                r = subprocess.run(["bash", "-c", line], cwd=self.work, env=env,
                                   capture_output=True, text=True, timeout=60)
                ok &= self.result(r.returncode == 0, f"{where}: {line}",
                                  f"  exit {r.returncode}\n{r.stdout}{r.stderr}")
            elif unit in DAEMONS and "--check-config" not in line:
                env, ops = self.daemon_env(unit)
                log = os.path.join(self.state, f"{unit}-{len(self.procs)}.log")
                p = subprocess.Popen(["bash", "-c", "exec " + line], cwd=self.work, env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
                self.procs.append((unit, p, ops, log))
                with open(os.path.join(self.state, f"{unit}.pids"), "a") as f:
                    f.write(f"{p.pid}\n")
                end = time.time() + 20
                while time.time() < end and p.poll() is None and http_get(ops, "/readyz")[0] != 200:
                    time.sleep(0.1)
                code, body = http_get(ops, "/readyz")
                ok &= self.result(code == 200, f"{where}: {line}",
                                  f"  not ready ({code} {body.strip()}); log:\n{self.tail(log)}")
            else:
                env, _ = self.daemon_env(unit) if unit in DAEMONS else (self.env, None)
                r = subprocess.run(["bash", "-c", line], cwd=self.work, env=env,
                                   capture_output=True, text=True, timeout=60)
                ok &= self.result(r.returncode == 0, f"{where}: {line}",
                                  f"  exit {r.returncode}\n{r.stdout}{r.stderr}")
        return ok

    @staticmethod
    def tail(path, n=15):
        try:
            return "\n".join(open(path).read().splitlines()[-n:])
        except OSError:
            return ""

    def metric(self, unit_index, name, labels):
        _, _, ops, _ = self.procs[unit_index]
        _, text = http_get(ops, "/metrics")
        total = 0.0
        for l in text.splitlines():
            if l.startswith(name) and all(f'{k}="{v}"' in l for k, v in labels.items()):
                total += float(l.rsplit(" ", 1)[1])
        return total

    def stop(self):
        for _, p, _, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _, _ in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    in_own_netns()
    bindir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug"))
    missing = [b for b in ("ztna-pki",) + DAEMONS if not os.access(os.path.join(bindir, b), os.X_OK)]
    if missing:
        print(f"docs: binaries missing in {bindir}: {', '.join(missing)} (cargo build --bins)")
        print("docs: 0 passed, 1 failed")
        return 1
    run = Runner(bindir)
    backend = toml_value(os.path.join(ROOT, "examples", "connector.toml"), "tcp")
    local = toml_value(os.path.join(ROOT, "examples", "agent.toml"), "listen")
    try:
        srv = echo_backend(backend)
    except OSError as e:
        print(f"docs: cannot start the example backend on {backend}: {e}")
        print("docs: 0 passed, 1 failed")
        return 1
    try:
        # README: a real deployment, then traffic through it.
        if run.run_block("README", sh_block("README.md", "A real deployment")):
            try:
                got = roundtrip(local, b"documented deployment\n")
                run.result(got == b"documented deployment\n",
                           f"README: bytes flow agent {local[0]}:{local[1]} -> backend {backend[0]}:{backend[1]}",
                           f"  got {got!r}")
            except OSError as e:
                run.result(False, "README: bytes flow through the agent", f"  {e}")

            # Certificate rotation: reloaded, flows still work.
            if run.run_block("operations.md rotation", sh_block("docs/operations.md", "Certificate rotation")):
                conn_log = next(l for u, _, _, l in run.procs if u == "ztna-connector")
                end = time.time() + 10
                while time.time() < end and "configuration reloaded" not in open(conn_log).read():
                    time.sleep(0.1)
                run.result("configuration reloaded" in open(conn_log).read(),
                           "operations.md rotation: the connector reloaded the new certificate",
                           run.tail(conn_log))
                try:
                    ok = roundtrip(local, b"after rotation\n") == b"after rotation\n"
                except OSError:
                    ok = False
                run.result(ok, "operations.md rotation: flows work after the reload")

            # Adding a connector: registered next to the first one.
            if run.run_block("operations.md add connector", sh_block("docs/operations.md", "Adding a connector")):
                im = next(i for i, (u, _, _, _) in enumerate(run.procs) if u == "ztna-intermediate")
                end = time.time() + 10
                n = 0.0
                while time.time() < end:
                    n = run.metric(im, "ztna_intermediate_service_connectors", {"service": "web"})
                    if n >= 2:
                        break
                    time.sleep(0.1)
                run.result(n >= 2, "operations.md add connector: the intermediate has 2 connectors for web",
                           f"  ztna_intermediate_service_connectors{{service=\"web\"}} = {n}")

                # CA rotation: nobody disconnected, both connectors still there (their connections
                # renewed in place to the new certificates), flows work.
                renewed_before = run.metric(im, "ztna_intermediate_renewals_total", {"result": "accepted"})
                if run.run_block("operations.md CA rotation", sh_block("docs/operations.md", "CA rotation")):
                    time.sleep(1)
                    revoked = run.metric(im, "ztna_intermediate_revocations_total", {})
                    n = run.metric(im, "ztna_intermediate_service_connectors", {"service": "web"})
                    renewed = run.metric(im, "ztna_intermediate_renewals_total", {"result": "accepted"}) - renewed_before
                    run.result(revoked == 0 and n >= 2 and renewed >= 3,
                               "operations.md CA rotation: no peer disconnected, 2 connectors and the agent renewed to new certificates",
                               f"  revocations_total {revoked}, service_connectors {n}, renewals accepted {renewed}")
                    try:
                        ok = roundtrip(local, b"after CA rotation\n") == b"after CA rotation\n"
                    except OSError:
                        ok = False
                    run.result(ok, "operations.md CA rotation: flows work with the new CA only")
    finally:
        run.stop()
        srv.close()
        if run.failed == 0:
            shutil.rmtree(run.work, ignore_errors=True)
        else:
            print(f"(scratch directory kept: {run.work})")
    print(f"docs: {run.passed} passed, {run.failed} failed")
    return 0 if run.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
