#!/usr/bin/env python3
"""P2P NAT matrix: direct agent <-> connector paths through Linux NATs, in network namespaces
(needs root). The release binaries run as real processes (ZTNA_BIN_DIR overrides where from).

    internet: a router (zp-inet) with a link to each of relay 10.231.10.2, NAT-A 10.231.11.2 and
      NAT-C 10.231.12.2 (at least one routed hop between the NATs, as on the internet)
    LAN-A 10.231.1.0/24: NAT-A .1, agent .2
    LAN-C 10.231.2.0/24 (a bridge on NAT-C): NAT-C .1, connector .2, agent-c .3 (same-LAN case)
    backend segment 10.231.3.0/24: connector .1, backend .2 (reachable only from the connector)

The NATs masquerade out of "wan" with nftables and forward from the internet only what conntrack
knows. A "home router" also drops unsolicited packets addressed to itself (input firewall); a
"bare MASQUERADE" host (a Linux box, VM or container host NATting without one) lets them reach its
stack, where they leave an UNREPLIED conntrack entry that makes its next mapping towards that
peer take another port. `fully-random` makes NAT-A symmetric.

Cases: a) both NATs home routers (endpoint-independent) -> later flows direct, the relay carries
none of their bytes; f) a UDP flow goes direct; g) a second service of the same connector goes
direct on the same connection (no second punch); d) the direct path cut mid-run -> new flows via
the relay within 3 s, none started after the cut fails; a2/a3) one NAT bare -> direct; a4) both
bare -> whatever the path, no flow fails or waits; b) NAT-A symmetric -> all via the relay, none
failed, none delayed; c) UDP between the NATs dropped -> the same; e) agent and connector on one
LAN -> direct via the local candidate; h) tickets: a crafted client (`ztna-hostile ticket`) on the
connector's LAN with a valid agent certificate and no, an expired, a wrong-service or otherwise
wrong ticket is refused, counted by reason, and reaches no backend (a valid ticket from the same
client works, as the control). Every transfer is 8 MiB through a TCP echo checked by
SHA-256; every case prints its figures (direct share from the agent's flows_total{path}, relay
bytes from the intermediate, time until the path was up, failed and slowest flows); the end
prints the matrix and "p2p: N passed, N failed". Namespaces are zp-*, never netns.py's ztna-*.
Every loop is bounded in count or time; namespaces and processes go in a finally. Set
ZTNA_P2P_KEEP=1 to keep the logs (the temporary directory is printed).
"""
import json, os, re, shutil, signal, subprocess, sys, tempfile, time, traceback, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("ZTNA_BIN_DIR") or os.path.join(REPO, "target", "release")
HELP = os.path.join(HERE, "helpers.py")
ME = os.path.abspath(__file__)
PREFIX = "zp-"
HOSTS = ["inet", "relay", "nata", "natc", "agent", "conn", "agentc", "back"]
RELAY, NATA, NATC = "10.231.10.2", "10.231.11.2", "10.231.12.2"
AGENT, CONN, AGENTC, BACKEND = "10.231.1.2", "10.231.2.2", "10.231.2.3", "10.231.3.2"
OPS = {"relay": 9470, "conn": 9471, "agent": 9472, "agentc": 9472}
MIB = 8
WORK = None
procs = {}
started = []  # daemons, in the order they were started (their logs are printed when a case fails)
results = []
matrix = []


# --- helpers that run inside a namespace (this file, called with --watch / --probe) -----------
def msum(text, name, *labels):
    """Sum of the samples of `name` whose label set contains every `labels` item."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ " and all(l in line for l in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def agent_figures(text):
    """direct_paths, flows direct ok, flows relay ok, flows not ok, service available."""
    flows = "ztna_agent_flows_total"
    return (msum(text, "ztna_agent_direct_paths"), msum(text, flows, 'path="direct"', 'result="ok"'),
            msum(text, flows, 'path="relay"', 'result="ok"'), msum(text, flows) - msum(text, flows, 'result="ok"'),
            msum(text, "ztna_agent_service_available", 'service="web"'))


def watch(port, stop, out, limit):
    """Polls the agent's metrics every 25 ms: `time direct_paths direct_ok relay_ok not_ok available`."""
    end = time.time() + limit
    with open(out, "w") as f:
        while not os.path.exists(stop) and time.time() < end:
            t = time.time()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    figs = agent_figures(r.read().decode())
                f.write(f"{t:.3f} " + " ".join(f"{x:.0f}" for x in figs) + "\n"); f.flush()
            except OSError:
                pass
            time.sleep(0.025)


def probe(port, stop, out, limit):
    """A new TCP flow (round trip through the echo) every 50 ms: `start end ok`."""
    sys.path.insert(0, HERE)
    from helpers import tcp_roundtrip
    end, i = time.time() + limit, 0
    with open(out, "w") as f:
        while not os.path.exists(stop) and time.time() < end:
            i += 1
            t = time.time()
            try:
                ok = tcp_roundtrip(port, b"probe %d" % i)
            except OSError:
                ok = False
            f.write(f"{t:.3f} {time.time():.3f} {1 if ok else 0}\n"); f.flush()
            time.sleep(0.05)


# --- the test bed ------------------------------------------------------------------------------
def run(*cmd, check=True, timeout=60, input=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def nsx(host, *cmd):
    return ["ip", "netns", "exec", PREFIX + host, *cmd]


def helper(host, *args, timeout=120):
    r = subprocess.run(nsx(host, sys.executable, HELP, *args), capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def teardown():
    for p in list(procs.values()):
        try:
            p["proc"].kill()
            p["proc"].wait(timeout=5)
        except Exception:
            pass
    procs.clear()
    for h in HOSTS:
        subprocess.run(["ip", "netns", "del", PREFIX + h], capture_output=True)


def veth(a, a_if, b, b_if, a_addr=None, b_addr=None):
    run("ip", "link", "add", a_if, "netns", PREFIX + a, "type", "veth", "peer", "name", b_if, "netns", PREFIX + b)
    for h, i, addr in [(a, a_if, a_addr), (b, b_if, b_addr)]:
        if addr:
            run(*nsx(h, "ip", "addr", "add", addr, "dev", i))
        run(*nsx(h, "ip", "link", "set", i, "up"))


def nft(host, script):
    run(*nsx(host, "nft", "-f", "-"), input=script)


def nat(host, symmetric=False, firewall=False):
    """Masquerade out of wan; from wan, forward only what conntrack knows. `firewall`: a home
    router's input policy too (unsolicited packets to the router itself dropped, so they leave
    no conntrack entry behind)."""
    nft(host, "table ip zp_nat\ndelete table ip zp_nat\n"
              "table ip zp_nat {\n"
              "  chain post { type nat hook postrouting priority srcnat; policy accept;\n"
              f"    oifname \"wan\" masquerade{' fully-random' if symmetric else ''}\n  }}\n"
              "  chain from_wan { type filter hook forward priority filter; policy accept;\n"
              "    iifname \"wan\" ct state established,related accept\n"
              "    iifname \"wan\" counter drop\n  }\n"
              + ("  chain to_router { type filter hook input priority filter; policy accept;\n"
                 "    iifname \"wan\" ct state established,related accept\n"
                 "    iifname \"wan\" counter drop\n  }\n" if firewall else "")
              + "}\n")


def cut(on):
    """Drops UDP between the two NATs at the internet router (on), or lifts that (off)."""
    if on:
        nft("inet", "table ip zp_cut {\n  chain nat_to_nat { type filter hook forward priority filter; policy accept;\n"
                    f"    ip saddr {NATA} ip daddr {NATC} meta l4proto udp counter drop\n"
                    f"    ip saddr {NATC} ip daddr {NATA} meta l4proto udp counter drop\n  }}\n}}\n")
    else:
        run(*nsx("inet", "nft", "delete", "table", "ip", "zp_cut"), check=False)


def cut_drops():
    out = run(*nsx("inet", "nft", "list", "table", "ip", "zp_cut"), check=False)
    return sum(int(x) for x in re.findall(r"packets (\d+)", out))


def conntrack_dump():
    """The NATs' UDP conntrack entries between the two NATs (evidence when a path fails)."""
    if not shutil.which("conntrack"):
        return "(conntrack not installed: apt-get install conntrack, for the NATs' tables)"
    out = []
    for h in ["nata", "natc"]:
        rows = [l for l in run(*nsx(h, "conntrack", "-L", "-p", "udp"), check=False).splitlines()
                if NATA in l and NATC in l]
        out.append(f"--- conntrack -L -p udp at {h} (entries between the NATs) ---\n" + "\n".join(rows))
    return "\n".join(out)


def setup():
    teardown()
    for h in HOSTS:
        run("ip", "netns", "add", PREFIX + h)
        run(*nsx(h, "ip", "link", "set", "lo", "up"))
    # The internet: a router between relay, NAT-A and NAT-C (one routed hop at least, so a
    # TTL-2 punch from behind a NAT dies here, as it would on the internet).
    run(*nsx("inet", "sysctl", "-qw", "net.ipv4.ip_forward=1"))
    for h, ip in [("relay", RELAY), ("nata", NATA), ("natc", NATC)]:
        gw = ip.rsplit(".", 1)[0] + ".1"
        veth(h, "wan", "inet", "i-" + h, ip + "/24", gw + "/24")
        run(*nsx(h, "ip", "route", "add", "default", "via", gw))
    veth("agent", "eth0", "nata", "lan", AGENT + "/24", "10.231.1.1/24")
    run(*nsx("natc", "ip", "link", "add", "lan", "type", "bridge"))
    run(*nsx("natc", "ip", "addr", "add", "10.231.2.1/24", "dev", "lan"))
    run(*nsx("natc", "ip", "link", "set", "lan", "up"))
    for h, ip in [("conn", CONN), ("agentc", AGENTC)]:
        veth(h, "eth0", "natc", "c-" + h, ip + "/24")
        run(*nsx("natc", "ip", "link", "set", "c-" + h, "master", "lan"))
    veth("conn", "back", "back", "eth0", "10.231.3.1/24", BACKEND + "/24")
    run(*nsx("agent", "ip", "route", "add", "default", "via", "10.231.1.1"))
    for h in ["conn", "agentc"]:
        run(*nsx(h, "ip", "route", "add", "default", "via", "10.231.2.1"))
    for h in ["nata", "natc"]:
        run(*nsx(h, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        nat(h, firewall=True)


def pki():
    d = os.path.join(WORK, "pki")
    pk = os.path.join(BIN, "ztna-pki")
    run(pk, "init", "--out", d, "--trust-domain", "p2p.test")
    for role, name in [("intermediate", "relay"), ("connector", "web-1"), ("agent", "alice"), ("agent", "carol"),
                       ("intermediate", "impostor")]:
        run(pk, "issue", "--ca", d, "--role", role, "--name", name, "--out", d)
    # Another CA in the same trust domain, with a relay of the same name (same SPIFFE ID, other
    # key): a forger's signer for case h.
    run(pk, "init", "--out", d + "/foreign", "--trust-domain", "p2p.test")
    run(pk, "issue", "--ca", d + "/foreign", "--role", "intermediate", "--name", "relay", "--out", d + "/foreign")
    return d


def tls(d, name):
    return f'[tls]\nca = "{d}/ca.pem"\ncert = "{d}/{name}.pem"\nkey = "{d}/{name}.key"\n'


def write(name, text):
    path = os.path.join(WORK, name + ".toml")
    open(path, "w").write(text)
    return path


def start(key, role, host, config):
    stop(key)
    started.append(key)
    log = open(os.path.join(WORK, key + ".log"), "a")
    p = subprocess.Popen(nsx(host, os.path.join(BIN, "ztna-" + role), "--config", config), stdout=log, stderr=log,
                         env=dict(os.environ, RUST_LOG="info"))
    procs[key] = {"proc": p, "host": host}
    return p


def stop(key):
    p = procs.pop(key, None)
    if p:
        p["proc"].send_signal(signal.SIGTERM)
        try:
            p["proc"].wait(timeout=10)
        except subprocess.TimeoutExpired:
            p["proc"].kill(); p["proc"].wait(timeout=5)


def log_of(key):
    try:
        return open(os.path.join(WORK, key + ".log")).read()
    except OSError:
        return ""


def tail(key, n=20):
    return f"--- last {n} lines of {key} ---\n" + "\n".join(log_of(key).splitlines()[-n:])


def scrape(host):
    return helper(host, "get", str(OPS[host]), "/metrics")[1]


def wait(cond, limit, step=0.05):
    end = time.time() + limit
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


class Agent:
    """A running agent (host agent or agentc), with a metrics watcher at 25 ms."""

    def __init__(self, host, name, d):
        self.host, self.key = host, "agent-" + host
        cfg = write(self.key, f'intermediates = ["{RELAY}:4433"]\nops_listen = "127.0.0.1:{OPS[host]}"\n'
                              f'drain_timeout = "2s"\n{tls(d, name)}'
                              '[[forward]]\nservice = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:8080"\n'
                              '[[forward]]\nservice = "web"\nprotocol = "udp"\nlisten = "127.0.0.1:8081"\n'
                              '[[forward]]\nservice = "db"\nprotocol = "tcp"\nlisten = "127.0.0.1:8082"\n')
        self.t_start = time.time()
        start(self.key, "agent", host, cfg)
        self.stopf, self.out = os.path.join(WORK, self.key + ".stop"), os.path.join(WORK, self.key + ".watch")
        for f in [self.stopf, self.out]:
            if os.path.exists(f):
                os.unlink(f)
        procs[self.key + "-watch"] = {"proc": subprocess.Popen(
            nsx(host, sys.executable, ME, "--watch", str(OPS[host]), self.stopf, self.out, "150")), "host": host}
        if not wait(lambda: (self.last() or [0] * 6)[5] == 1, 20):
            self.close()
            raise AssertionError(f"{self.key}: the service never became available")

    def rows(self):
        try:
            return [[float(x) for x in l.split()] for l in open(self.out).read().splitlines() if len(l.split()) == 6]
        except OSError:
            return []

    def last(self):
        r = self.rows()
        return r[-1] if r else None

    def now(self):
        """A fresh reading (one taken after this call started)."""
        t = time.time()
        wait(lambda: (self.last() or [0])[0] >= t, 2, step=0.02)
        return self.last()

    def close(self):
        open(self.stopf, "w").close()
        w = procs.pop(self.key + "-watch", None)
        if w:
            w["proc"].wait(timeout=10)
        stop(self.key)


def relay_bytes(text=None, protocol=""):
    text = text if text is not None else scrape("relay")
    return msum(text, "ztna_intermediate_relay_bytes_total", f'protocol="{protocol}"' if protocol else "")


def p2p_counts():
    text = scrape("relay")
    return {r: msum(text, "ztna_intermediate_p2p_total", f'result="{r}"') for r in ["success", "failed", "denied", "disabled"]}


def transfer(agent, port="8080"):
    """One 8 MiB TCP transfer through the echo (SHA-256 both ways): ok, seconds, path, relay bytes.
    Port 8080 is service web, 8082 service db (same connector, same echo backend)."""
    a0, r0 = agent.now(), relay_bytes()
    ok, out = helper(agent.host, "big", port, str(MIB))
    a1, r1 = agent.now(), relay_bytes()
    dd, dr = a1[2] - a0[2], a1[3] - a0[3]
    path = "direct" if (dd, dr) == (1, 0) else "relay" if (dd, dr) == (0, 1) else f"?(direct +{dd:.0f}, relay +{dr:.0f})"
    secs = float(out.split(" in ")[1].split()[0]) if ok and " in " in out else float("nan")
    return {"ok": ok, "secs": secs, "path": path, "relay_bytes": r1 - r0, "out": out}


def describe(rows):
    return ", ".join(f"{r['path']} {r['secs']:.2f} s{'' if r['ok'] else ' FAILED'} (relay +{r['relay_bytes'] / 1048576:.1f} MiB)" for r in rows)


def probe_start(agent, tag, limit=60):
    stopf, out = os.path.join(WORK, tag + ".stop"), os.path.join(WORK, tag + ".probe")
    if tag in procs:  # left running by a case that failed half-way
        procs.pop(tag)["proc"].kill()
    for f in [stopf, out]:
        if os.path.exists(f):
            os.unlink(f)
    procs[tag] = {"proc": subprocess.Popen(nsx(agent.host, sys.executable, ME, "--probe", "8080", stopf, out, str(limit))),
                  "host": agent.host}
    return tag, stopf, out


def probe_finish(handle):
    tag, stopf, out = handle
    open(stopf, "w").close()
    procs.pop(tag)["proc"].wait(timeout=30)
    return [(float(t), float(e) - float(t), ok == "1") for t, e, ok in
            (l.split() for l in open(out).read().splitlines() if len(l.split()) == 3)]


def case(name):
    def deco(f):
        def wrapper():
            print(f"--- case: {name}", flush=True)
            fig = {"case": name, "outcome": "?", "share": "-", "figures": ""}
            first = len(started)
            try:
                detail = f(fig)
                print(f"PASS {name}: {detail}", flush=True)
                results.append(True)
                fig["result"] = "PASS"
            except Exception as e:
                print(f"FAIL {name}: {e}", flush=True)
                traceback.print_tb(e.__traceback__, limit=3)
                for key in dict.fromkeys(["relay", "connector"] + started[first:]):
                    print(tail(key))
                results.append(False)
                fig["result"] = "FAIL"
                fig["figures"] = fig["figures"] or str(e)[:200]
            matrix.append(fig)
        return wrapper
    return deco


# ---------------------------------------------------------------------------------------------
def main():
    global WORK
    if os.geteuid() != 0:
        print("SKIP p2p suite: needs root"); return 0
    for tool in ["ip", "nft"]:
        if not shutil.which(tool):
            print(f"SKIP p2p suite: {tool} missing (apt-get install iproute2 nftables)"); return 0
    if not os.environ.get("ZTNA_BIN_DIR"):
        print("building release binaries", flush=True)
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "ztna-intermediate", "-p", "ztna-connector",
                        "-p", "ztna-agent", "-p", "ztna-pki"], cwd=REPO, check=True)
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "ztna-integration", "--bin", "ztna-hostile"],
                       cwd=REPO, check=True)
    print(f"binaries: {BIN}", flush=True)
    WORK = tempfile.mkdtemp(prefix="ztna-p2p.")
    print(f"work directory: {WORK}", flush=True)
    t_suite = time.time()
    setup()
    d = pki()
    policy = "".join(f'[[policy]]\nservice = "{s}"\nconnectors = ["spiffe://p2p.test/connector/web-*"]\n'
                     'agents = ["spiffe://p2p.test/agent/alice", "spiffe://p2p.test/agent/carol"]\n' for s in ["web", "db"])
    start("relay", "intermediate", "relay", write("relay", f'listen = "0.0.0.0:4433"\nops_listen = "127.0.0.1:9470"\n'
                                                         f'drain_timeout = "2s"\n{tls(d, "relay")}{policy}'))
    procs["backend"] = {"proc": subprocess.Popen(nsx("back", sys.executable, HELP, "backends-on", BACKEND, "7000", "7001"),
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), "host": "back"}
    conn_text = (f'intermediates = ["{RELAY}:4433"]\nops_listen = "127.0.0.1:9471"\ndrain_timeout = "2s"\n'
                 f'{tls(d, "web-1")}[[service]]\nname = "web"\ntcp = "{BACKEND}:7000"\nudp = "{BACKEND}:7001"\n'
                 f'[[service]]\nname = "db"\ntcp = "{BACKEND}:7000"\n')
    conn_cfg = write("connector", conn_text)

    def fresh_start(cfg=None):
        """Each case starts clean: the NATs' conntrack tables flushed (when conntrack is installed)
        and a new connector process (a new source port). A NAT mapping left by an earlier case
        would otherwise decide this one: Linux reuses a source's existing mapping for its new
        destinations."""
        for h in ["nata", "natc"]:
            if shutil.which("conntrack"):
                run(*nsx(h, "conntrack", "-F"), check=False)
        stop("connector")
        start("connector", "connector", "conn", cfg or conn_cfg)
        ok = wait(lambda: msum(scrape("conn"), "ztna_connector_intermediates_connected") == 1, 20)
        if not ok:
            raise AssertionError("the connector did not register at the relay")

    try:
        fresh_start()
    except AssertionError as e:
        print(f"FAIL setup: {e}"); [print(tail(k)) for k in ["relay", "connector"]]
        print("p2p: 0 passed, 1 failed"); return 1
    state = {}

    def direct_case(fig, a, n_later, limit=10, require=True):
        """First flow (via the relay while the path is brokered), the direct path up, then
        `n_later` 8 MiB flows that must go direct with no byte through the relay. Probes (a new
        flow every 50 ms) run until the path is up, so failed attempts are retried and any flow
        delayed by an attempt would show."""
        p0, c0 = p2p_counts(), scrape("conn")
        t0 = time.time()
        pr = probe_start(a, a.key + "-first", limit=limit + 5)
        up = wait(lambda: a.last()[1] == 1, limit)
        flows = probe_finish(pr)
        t_first = flows[0][0] if flows else t0
        t_up = next((r[0] for r in a.rows() if r[1] == 1), float("nan")) - t_first
        first = a.now()
        later = [transfer(a) for _ in range(n_later)]
        end, p1, c1 = a.now(), p2p_counts(), scrape("conn")
        failed = sum(not r[2] for r in flows) + sum(not r["ok"] for r in later) + end[4]
        later_relay = sum(r["relay_bytes"] for r in later)
        slowest = max((r[1] for r in flows), default=float("nan"))
        fig["share"] = f"{end[2]:.0f}/{end[2] + end[3]:.0f} direct"
        fig["outcome"] = "direct" if up and all(r["path"] == "direct" for r in later) else "relay"
        fig["figures"] = (f"direct up {t_up:.2f} s after the first flow; later {n_later}x8 MiB: relay bytes {later_relay:.0f}; "
                          f"failed {failed:.0f}; slowest of {len(flows)} flows before/while brokering {slowest:.3f} s")
        line = (f"{len(flows)} flows while the path came up ({first[2]:.0f} direct, {first[3]:.0f} relay); later: {describe(later)}; "
                f"{fig['figures']}; relay p2p_total success +{p1['success'] - p0['success']:.0f} failed +{p1['failed'] - p0['failed']:.0f}; "
                f"connector direct_connections {msum(c1, 'ztna_connector_direct_connections'):.0f}, "
                f"direct_refused_total +{msum(c1, 'ztna_connector_direct_refused_total') - msum(c0, 'ztna_connector_direct_refused_total'):.0f}")
        assert failed == 0, line
        assert slowest < 1.0, f"a flow took {slowest:.2f} s while the path was brokered: " + line
        if not up and not require:
            assert all(r["path"] == "relay" for r in later), line
            return f"{line}; no direct path (not required here), flows via the relay\n{conntrack_dump()}"
        assert up, f"the direct path never came up (ztna_agent_direct_paths 0 for {limit} s): " + line + "\n" + conntrack_dump()
        assert all(r["path"] == "direct" for r in later) and later_relay == 0, line
        assert p1["success"] > p0["success"], line
        return line

    @case("a) both NATs endpoint-independent (MASQUERADE, home-router firewall): later flows direct, the relay carries none of their bytes")
    def ca(fig):
        reach = subprocess.run(nsx("agent", sys.executable, "-c", f"import socket; socket.create_connection(('{BACKEND}', 7000), 1)"),
                               capture_output=True)
        assert reach.returncode != 0, "the agent host can reach the backend"
        fresh_start()
        a = state["agent"] = Agent("agent", "alice", d)
        return direct_case(fig, a, 3)
    ca()

    @case("f) a UDP flow (200 round trips, 1200/8192-byte datagrams) goes direct, as in (a)")
    def cf(fig):
        a = state.get("agent")
        assert a and a.now()[1] == 1, "no direct path up (case a)"
        a0, r0 = a.now(), relay_bytes(protocol="udp")
        ok, out = helper(a.host, "udpmany", "8081", "200", "INJECT")
        ok2, out2 = helper(a.host, "udpsizes", "8081", "1200,8192")
        a1, r1 = a.now(), relay_bytes(protocol="udp")
        dd, dr = a1[2] - a0[2], a1[3] - a0[3]
        fig["share"] = f"{dd:.0f}/{dd + dr:.0f} direct"
        fig["outcome"] = "direct" if (dd, dr) == (2, 0) else "relay"
        fig["figures"] = f"{out}; {out2.replace(chr(10), ', ')}; relay UDP bytes +{r1 - r0:.0f}"
        line = f"UDP flows direct +{dd:.0f}, relay +{dr:.0f}; {fig['figures']}"
        assert ok and ok2, line
        assert (dd, dr) == (2, 0) and r1 == r0, line
        return line
    cf()

    @case("g) a second service of the same connector (db) shares the direct connection: no second punch or connection")
    def cg(fig):
        a = state.get("agent")
        assert a and a.now()[1] == 1, "no direct path up (case a)"
        p0, k0 = p2p_counts(), msum(scrape("conn"), "ztna_connector_direct_punches_total")
        t0 = time.time()
        # db's first flow goes via the relay while its ticket is presented on web's path.
        first = transfer(a, port="8082")
        up = wait(lambda: a.last()[1] == 2, 5)
        t_up = next((r[0] for r in a.rows() if r[0] >= t0 and r[1] == 2), float("nan")) - t0
        later = [transfer(a, port="8082") for _ in range(2)]
        c1, p1 = scrape("conn"), p2p_counts()
        conns = msum(c1, "ztna_connector_direct_connections")
        punched = msum(c1, "ztna_connector_direct_punches_total") - k0
        later_relay = sum(r["relay_bytes"] for r in later)
        fig["share"] = f"{sum(r['path'] == 'direct' for r in [first] + later)}/3 direct"
        fig["outcome"] = "direct on web's connection" if up and conns == 1 and all(
            r["path"] == "direct" for r in later) else "not shared"
        fig["figures"] = (f"db direct {t_up:.2f} s after its first flow started; connector direct_connections {conns:.0f}, "
                          f"punches for db {punched:.0f}; "
                          f"later 2x8 MiB: relay bytes {later_relay:.0f}")
        line = (f"first db flow: {describe([first])}; later: {describe(later)}; {fig['figures']}; "
                f"relay p2p_total success +{p1['success'] - p0['success']:.0f}")
        assert first["ok"] and all(r["ok"] for r in later), line
        assert up, "db never went direct: " + line
        assert conns == 1, "db got a direct connection of its own: " + line
        assert punched == 0, "the connector punched again for db: " + line
        assert all(r["path"] == "direct" for r in later) and later_relay == 0, line
        assert p1["success"] == p0["success"] + 1, line
        return line
    cg()

    @case("d) direct path cut mid-run (UDP between the NATs dropped): new flows via the relay within 3 s, none fails")
    def cd(fig):
        a = state.get("agent")
        assert a and a.now()[1] >= 1, "no direct path up (case a)"
        pr = probe_start(a, "cut")
        time.sleep(1.5)
        base = a.now()
        t_cut = time.time()
        cut(True)
        # The rule is in force once nft has returned. A flow that started before that may have
        # been accepted on the direct path and then lost its packets mid-flow: it is counted
        # with the flows started before the cut (a flow cut mid-way cannot be saved; new ones
        # must be).
        t_cut_in_force = time.time()
        try:
            relayed = wait(lambda: a.last()[3] > base[3] + 3, 10)
            time.sleep(1.0)
            rows = probe_finish(pr)
            w = [r for r in a.rows() if r[0] >= t_cut]
            t_down = next((r[0] for r in w if r[1] == 0), float("nan")) - t_cut
            t_relay = next((r[0] for r in w if r[3] > base[3]), float("nan")) - t_cut
            after = [r for r in rows if r[0] >= t_cut_in_force]
            failed_after = [r for r in after if not r[2]]
            failed_before = [r for r in rows if r[0] < t_cut_in_force and not r[2]]
            slowest = max((r[1] for r in after), default=float("nan"))
            x = transfer(a)
            drops = cut_drops()
        finally:
            cut(False)
        t_lift = time.time()
        pr2 = probe_start(a, "lifted", limit=25)
        back = wait(lambda: a.last()[1] == 1, 20)
        t_back = time.time() - t_lift
        probe_finish(pr2)
        fig["share"] = f"after the cut {0 if x['path'] == 'relay' else 1}/1 direct (8 MiB)"
        fig["outcome"] = f"relay after {t_relay:.2f} s"
        fig["figures"] = (f"path down after {t_down:.2f} s, first flow via the relay {t_relay:.2f} s after the cut; "
                          f"{len(after)} flows started after the cut, {len(failed_after)} failed, slowest {slowest:.2f} s")
        line = (f"{fig['figures']}; 8 MiB after the cut: {describe([x])}; {len(failed_before)} flow(s) started before the cut "
                f"was in force ({(t_cut_in_force - t_cut) * 1000:.0f} ms after it was asked for) failed; "
                f"{drops} UDP packets dropped by the cut; " +
                (f"direct again {t_back:.2f} s after the cut was lifted" if back else "not direct again within 20 s after the cut was lifted"))
        assert relayed, "new flows never went via the relay after the cut: " + line
        assert not failed_after, line
        assert x["ok"] and x["path"] == "relay", line
        # 3 s idle timeout; 0.3 s for the 25 ms metrics sampling and scheduling on a busy machine.
        assert t_relay <= 3.3, f"new flows went via the relay only {t_relay:.2f} s after the cut (idle timeout 3 s): " + line
        assert back, line
        return line
    cd()
    if state.get("agent"):
        state.pop("agent").close()

    def nat_variant(fig, fw_a, fw_c, require=True, trials=1):
        """`trials` fresh agents (and connectors), one after the other: each must get its direct
        path, so an outcome that depends on which side's first packet wins a race shows."""
        nat("nata", firewall=fw_a)
        nat("natc", firewall=fw_c)
        lines = []
        try:
            for i in range(trials):
                fresh_start()
                a = Agent("agent", "alice", d)
                try:
                    lines.append(direct_case(fig, a, 2 if i == 0 else 1, limit=8, require=require))
                except AssertionError as e:
                    fig["outcome"] = f"relay in trial {i + 1} (of {trials}; {i} direct before)"
                    raise AssertionError(f"trial {i + 1} of {trials} ({i} went direct before): {e}")
                finally:
                    a.close()
        finally:
            for h in ["nata", "natc"]:
                nat(h, firewall=True)
        if trials > 1:
            fig["outcome"] = f"{fig['outcome']} in {trials}/{trials} trials"
        return " | ".join(f"trial {i + 1}: {l}" for i, l in enumerate(lines)) if trials > 1 else lines[0]

    # Bare MASQUERADE (a Linux host or VM that NATs without an input firewall, e.g. Docker or a
    # NAT instance): a packet from the peer that arrives before our own first packet to it reaches
    # the router's stack and leaves an UNREPLIED conntrack entry, and the next outbound mapping to
    # that peer then gets another port (the NAT stops being endpoint-independent for that peer).
    # Which side's packet arrives first decides the outcome, so both combinations are cases.
    @case("a2) agent behind a home router, connector behind bare MASQUERADE (no input firewall): later flows direct, 3 of 3 trials")
    def ca2(fig):
        return nat_variant(fig, True, False, trials=3)
    ca2()

    @case("a3) agent behind bare MASQUERADE (no input firewall), connector behind a home router: later flows direct, 3 of 3 trials")
    def ca3(fig):
        return nat_variant(fig, False, True, trials=3)
    ca3()

    @case("a4) both behind bare MASQUERADE: whichever path, no flow fails or waits")
    def ca4(fig):
        return nat_variant(fig, False, False, require=False)
    ca4()

    def no_direct_case(fig, tag):
        """A fresh agent while no direct path can work: every flow via the relay, none failed, none delayed."""
        fresh_start()
        p0 = p2p_counts()
        a = Agent("agent", "alice", d)
        try:
            pr = probe_start(a, tag)
            reported = wait(lambda: p2p_counts()["failed"] > p0["failed"], 12, step=0.3)
            time.sleep(0.5)
            flows = probe_finish(pr)
            rows = [transfer(a) for _ in range(2)]
            end = a.now()
            p1 = p2p_counts()
            ever_up = any(r[1] for r in a.rows())
        finally:
            a.close()
        failed = sum(not r[2] for r in flows) + sum(not r["ok"] for r in rows)
        durs = sorted(r[1] for r in flows)
        slowest, median = (durs[-1], durs[len(durs) // 2]) if durs else (float("nan"),) * 2
        fig["share"] = f"{end[2]:.0f}/{end[2] + end[3]:.0f} direct"
        fig["outcome"] = "relay" if end[2] == 0 and not ever_up else "direct"
        fig["figures"] = (f"{end[2] + end[3]:.0f} flows, failed {failed + end[4]:.0f}; slowest {slowest:.3f} s (median {median:.3f} s); "
                          f"relay bytes {sum(r['relay_bytes'] for r in rows) / 1048576:.1f} MiB for 2x8 MiB")
        line = (f"{fig['figures']}; 8 MiB: {describe(rows)}; relay p2p_total failed +{p1['failed'] - p0['failed']:.0f}, "
                f"success +{p1['success'] - p0['success']:.0f}")
        assert reported, "no failed direct attempt was reported to the relay within 12 s (was one tried?): " + line
        assert not ever_up and end[2] == 0, "a direct path came up: " + line
        assert failed == 0 and end[4] == 0, line
        assert all(r["ok"] and r["path"] == "relay" for r in rows), line
        assert slowest < 1.0, f"a flow took {slowest:.2f} s: " + line
        return line

    @case("b) NAT-A symmetric (masquerade fully-random): all flows via the relay, none failed, none delayed")
    def cb(fig):
        nat("nata", symmetric=True, firewall=True)
        try:
            return no_direct_case(fig, "symmetric")
        finally:
            nat("nata", firewall=True)
    cb()

    @case("c) UDP between the NATs dropped: all flows via the relay, none failed, none delayed")
    def cc(fig):
        cut(True)
        try:
            line = no_direct_case(fig, "blocked")
            drops = cut_drops()
        finally:
            cut(False)
        assert drops > 0, "the drop rules dropped nothing: " + line
        return f"{line}; {drops} UDP packets between the NATs dropped"
    cc()

    @case("e) agent and connector on the same LAN (behind NAT-C, no hairpin): direct via the local candidate")
    def ce(fig):
        fresh_start()
        a = Agent("agentc", "carol", d)
        try:
            line = direct_case(fig, a, 2)
        finally:
            a.close()
        addrs = re.findall(r"direct path up.*?addr=(\S+)", log_of(a.key))
        fig["outcome"] = f"direct via {addrs[-1]}" if addrs else fig["outcome"]
        assert addrs and all(x.startswith(CONN + ":") for x in addrs), f"not via the connector's LAN address {CONN}: {addrs}; " + line
        return f"{line}; the agent's direct path went to {addrs}"
    ce()

    def syn_counter(on):
        """Counts TCP connection attempts that reach the backend host (on), or removes that."""
        if on:
            nft("back", "table ip zp_syn {\n  chain in { type filter hook input priority filter; policy accept;\n"
                        "    tcp dport 7000 tcp flags & (syn | ack) == syn counter\n  }\n}\n")
        else:
            run(*nsx("back", "nft", "delete", "table", "ip", "zp_syn"), check=False)

    def syns():
        out = run(*nsx("back", "nft", "list", "table", "ip", "zp_syn"), check=False)
        return sum(int(x) for x in re.findall(r"packets (\d+)", out))

    @case("h) tickets: a crafted client on the connector's LAN with a valid agent certificate and no, an expired, "
          "a wrong-service or otherwise wrong ticket is refused by the connector, counted, and reaches no backend")
    def ch(fig):
        # On the connector's LAN nothing but the ticket stands between a client with a valid agent
        # certificate and the connector's QUIC endpoint (from the internet, NAT-C's filter already
        # drops what no punch opened). The connector binds a known port for this case.
        port = 4600
        fresh_start(write("connector-h", f'bind = "0.0.0.0:{port}"\n' + conn_text))
        me, web1 = "spiffe://p2p.test/agent/carol", "spiffe://p2p.test/connector/web-1"
        signer = ["--signer-cert", f"{d}/relay.pem", "--signer-key", f"{d}/relay.key"]
        cases = [
            ("no ticket", [], "no_ticket"),
            ("expired 10 s ago", signer + ["--lifetime-ms", "-10000"], "expired"),
            ("for db, used for web", signer + ["--for-services", "db"], "service_not_allowed"),
            ("for another agent (alice)", signer + ["--for-agent", "spiffe://p2p.test/agent/alice"], "wrong_agent"),
            ("for another connector (web-2)", signer + ["--connector", "spiffe://p2p.test/connector/web-2"], "wrong_connector"),
            ("signed by an intermediate the connector is not connected to",
             ["--signer-cert", f"{d}/impostor.pem", "--signer-key", f"{d}/impostor.key"], "unknown_intermediate"),
            ("forged: another CA's relay under the relay's name",
             ["--signer-cert", f"{d}/foreign/relay.pem", "--signer-key", f"{d}/foreign/relay.key",
              "--signer-ca", f"{d}/foreign/ca.pem"], "bad_signature"),
            ("living longer than tickets may (1 h)", signer + ["--lifetime-ms", "3600000"], "bad_ticket"),
            ("garbage", ["--raw-ticket", "deadbeef"], "malformed"),
        ]

        def probe_ticket(extra):
            args = [os.path.join(BIN, "ztna-hostile"), "ticket", "--ca", f"{d}/ca.pem", "--cert", f"{d}/carol.pem",
                    "--key", f"{d}/carol.key", "--server", f"{CONN}:{port}", "--service", "web"]
            if "--connector" not in extra:
                args += ["--connector", web1]
            r = subprocess.run(nsx("agentc", *args, *extra), capture_output=True, text=True, timeout=30)
            lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if r.returncode != 0 or not lines:
                raise AssertionError(f"ztna-hostile ticket {' '.join(extra)} failed (rc {r.returncode}): "
                                     f"{(r.stdout + r.stderr).strip()[-400:]}")
            return json.loads(lines[-1])

        def refused(label):
            return msum(scrape("conn"), "ztna_connector_direct_refused_total", f'reason="{label}"')

        syn_counter(True)
        try:
            c0 = scrape("conn")
            seen = []
            for name, extra, label in cases:
                before = refused(label)
                out = probe_ticket(extra)
                counted = wait(lambda: refused(label) > before, 3)
                seen.append(f"{name}: {out['outcome']} ({label}{'' if counted else ' NOT COUNTED'}: {out['reason'][:70]})")
                assert out["outcome"] != "accepted", f"{name}: the connector accepted the flow; " + "; ".join(seen)
                assert counted, f"{name}: not counted as direct_refused_total{{reason=\"{label}\"}}; " + "; ".join(seen)
            refused_syns = syns()
            c1 = scrape("conn")
            good = probe_ticket(signer)
            good_syns = syns()
            c2 = scrape("conn")
        finally:
            syn_counter(False)
        direct = lambda t: msum(t, "ztna_connector_direct_flows_total")
        total_refused = lambda t: msum(t, "ztna_connector_direct_refused_total")
        fig["outcome"] = f"{len(cases)} of {len(cases)} refused, valid ticket accepted" if good["outcome"] == "accepted" else "?"
        fig["share"] = "-"
        fig["figures"] = (f"refused: {', '.join(l for _, _, l in cases)}; backend connection attempts during them "
                          f"{refused_syns}; with a valid ticket: {good['outcome']}, echoed {good['echoed']}, backend attempts "
                          f"+{good_syns - refused_syns}")
        line = f"{'; '.join(seen)}; {fig['figures']}"
        assert refused_syns == 0, "a refused ticket reached the backend: " + line
        assert direct(c1) == direct(c0), "a refused ticket opened a direct flow: " + line
        assert total_refused(c1) - total_refused(c0) == len(cases), "refusals miscounted: " + line
        # The control: the same client, port and certificate with the relay's genuine ticket.
        assert good["outcome"] == "accepted" and good["echoed"], "a valid ticket did not get a working flow: " + line
        assert good_syns - refused_syns == 1 and direct(c2) == direct(c1) + 1, line
        return line
    ch()

    print()
    print("NAT matrix:")
    for m in matrix:
        print(f"  {m.get('result', '?'):4} {m['case'].split(':')[0]:<70} -> {m['outcome']}; {m['share']}; {m['figures']}")
    print(f"suite time {time.time() - t_suite:.0f} s")
    print(f"p2p: {sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--watch":
        watch(int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])); sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])); sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 1
    try:
        code = main()
    finally:
        teardown()
        if WORK and not os.environ.get("ZTNA_P2P_KEEP"):
            shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(code)
