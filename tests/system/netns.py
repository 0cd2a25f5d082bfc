#!/usr/bin/env python3
"""The whole product across separate hosts made of network namespaces (needs root).

Hosts: agent, relay-a, relay-b, connector, backend, and lan (a client on the agent's local
network). Point-to-point links only, so routing decides who reaches whom: the agent reaches the
relays, the connector dials out to the relays and is the only host on the backend's private
segment. The release binaries run as real processes.
Each case prints PASS/FAIL with its measured figures; the last line is "N passed, N failed".
Every load loop is bounded in count and time; traffic stays on these namespaces' addresses.
"""
import hashlib, json, os, re, shutil, signal, subprocess, sys, tempfile, time, traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
# ZTNA_BIN_DIR runs the suite against other binaries (e.g. an older build, for before/after).
BIN = os.environ.get("ZTNA_BIN_DIR") or os.path.join(REPO, "target", "release")
HELP = os.path.join(HERE, "helpers.py")
PREFIX = "ztna-"
HOSTS = ["agent", "relay-a", "relay-b", "connector", "backend", "lan"]
# (host a, host b, subnet): a gets .1, b gets .2
LINKS = [
    ("agent", "relay-a", "10.201.1"),
    ("agent", "relay-b", "10.201.2"),
    ("connector", "relay-a", "10.202.1"),
    ("connector", "relay-b", "10.202.2"),
    ("connector", "backend", "10.203.1"),
    ("agent", "lan", "10.204.1"),
]
SHORT = {"agent": "ag", "relay-a": "ra", "relay-b": "rb", "connector": "co", "backend": "be", "lan": "la"}
# The agent's address on the link to the lan host, where a UDP forward serves LAN clients.
AGENT_ON_LAN = "10.204.1.1"
RELAY_FOR_AGENT = {"relay-a": "10.201.1.2", "relay-b": "10.201.2.2"}
RELAY_FOR_CONNECTOR = {"relay-a": "10.202.1.2", "relay-b": "10.202.2.2"}
BACKEND = "10.203.1.2"
OPS = {"relay-a": 9470, "relay-b": 9470, "connector": 9471, "agent": 9472}

WORK = tempfile.mkdtemp(prefix="ztna-netns.")
procs = {}
results = []


def run(*cmd, check=True, capture=True, timeout=120):
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout if capture else ""


def nsx(host, *cmd):
    return ["ip", "netns", "exec", PREFIX + host, *cmd]


def helper(host, *args, timeout=120):
    r = subprocess.run(nsx(host, sys.executable, HELP, *args), capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def veth(a, b):
    return f"v-{SHORT[a]}-{SHORT[b]}"


def teardown():
    for p in list(procs.values()):
        try:
            p["proc"].kill()
            p["proc"].wait(timeout=5)
        except Exception:
            pass
    for h in HOSTS:
        subprocess.run(["ip", "netns", "del", PREFIX + h], capture_output=True)


def setup():
    teardown()
    for h in HOSTS:
        run("ip", "netns", "add", PREFIX + h)
        run(*nsx(h, "ip", "link", "set", "lo", "up"))
    for a, b, net in LINKS:
        run("ip", "link", "add", veth(a, b), "netns", PREFIX + a, "type", "veth", "peer", "name", veth(b, a), "netns", PREFIX + b)
        run(*nsx(a, "ip", "addr", "add", f"{net}.1/24", "dev", veth(a, b)))
        run(*nsx(b, "ip", "addr", "add", f"{net}.2/24", "dev", veth(b, a)))
        run(*nsx(a, "ip", "link", "set", veth(a, b), "up"))
        run(*nsx(b, "ip", "link", "set", veth(b, a), "up"))


def pki():
    d = os.path.join(WORK, "pki")
    pk = os.path.join(BIN, "ztna-pki")
    run(pk, "init", "--out", d, "--trust-domain", "netns.test")
    for role, name in [("intermediate", "relay-a"), ("intermediate", "relay-b"), ("connector", "web-1"),
                       ("agent", "alice"), ("agent", "mallory"), ("connector", "imposter")]:
        run(pk, "issue", "--ca", d, "--role", role, "--name", name, "--out", d)
    run(pk, "issue", "--ca", d, "--role", "agent", "--name", "old", "--out", d, "--days", "1")
    foreign = os.path.join(WORK, "foreign")
    run(pk, "init", "--out", foreign, "--trust-domain", "netns.test")
    run(pk, "issue", "--ca", foreign, "--role", "agent", "--name", "eve", "--out", foreign)
    return d, foreign


def tls(d, name, ca_dir=None):
    return f'[tls]\nca = "{ca_dir or d}/ca.pem"\ncert = "{d}/{name}.pem"\nkey = "{d}/{name}.key"\n'


def write(name, text):
    path = os.path.join(WORK, name + ".toml")
    open(path, "w").write(text)
    return path


def start(key, role, host, config):
    log = open(os.path.join(WORK, key + ".log"), "a")
    env = dict(os.environ, RUST_LOG=os.environ.get("ZTNA_NETNS_LOG", "info"))
    p = subprocess.Popen(nsx(host, os.path.join(BIN, "ztna-" + role), "--config", config), stdout=log, stderr=log, env=env)
    procs[key] = {"proc": p, "role": role, "host": host, "config": config}
    return p


def tail(key, n=15):
    try:
        lines = open(os.path.join(WORK, key + ".log")).read().splitlines()
    except OSError:
        return ""
    return f"--- last {n} lines of {key} ---\n" + "\n".join(lines[-n:])


def metric(host, name, labels=""):
    ok, out = helper(host, "get", str(OPS[host]), "/metrics")
    total, found = 0.0, False
    for line in out.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ ") and all(l in line for l in labels.split(",") if l):
            total += float(line.rsplit(" ", 1)[1]); found = True
    return total if found else None


def wait(cond, limit, step=0.1):
    end = time.time() + limit
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


# ZTNA_NETNS_CASES=10,11 runs only those cases (after the common setup), each ZTNA_NETNS_REPEAT
# times: for chasing a rare failure. ZTNA_NETNS_LOG sets the daemons' RUST_LOG (default info);
# ZTNA_NETNS_KEEP=1 keeps the logs' directory.
ONLY = {c for c in os.environ.get("ZTNA_NETNS_CASES", "").split(",") if c}
REPEAT = int(os.environ.get("ZTNA_NETNS_REPEAT", "1"))


def case(name):
    def deco(f):
        def wrapper():
            if ONLY and name.split(".")[0] not in ONLY:
                print(f"--- case: {name}: not selected (ZTNA_NETNS_CASES)", flush=True)
                return
            for _ in range(REPEAT):
                once()

        def once():
            print(f"--- case: {name}", flush=True)
            try:
                detail = f()
                print(f"PASS {name}: {detail}", flush=True)
                results.append(True)
            except Exception as e:
                print(f"FAIL {name}: {e}", flush=True)
                traceback.print_exc(limit=2)
                for key in procs:
                    print(tail(key))
                results.append(False)
        return wrapper
    return deco


def probe_start(tag):
    stop, out = os.path.join(WORK, tag + ".stop"), os.path.join(WORK, tag + ".probe")
    if os.path.exists(stop):
        os.remove(stop)  # a repeated case (ZTNA_NETNS_REPEAT)
    p = subprocess.Popen(nsx("agent", sys.executable, HELP, "probe", "8080", stop, out))
    return p, stop, out


def probe_finish(p, stop, out):
    open(stop, "w").close()
    p.wait(timeout=30)
    rows = [l.split() for l in open(out).read().splitlines() if l.strip()]
    return [(float(t), ok == "1", float(end) - float(t)) for t, end, ok in rows]


def connector_on(n):
    return wait(lambda: metric("connector", "ztna_connector_intermediates_connected") == n, 20)


def restart_relay(name):
    start(name, "intermediate", name, procs[name]["config"])
    return wait(lambda: helper(name, "get", "9470", "/readyz")[0], 10)


BIG_TXT = [("%02d" % i) * 120 for i in range(8)]  # 8 strings of 240 chars: a ~2 KB answer


def real_servers(pki_dir):
    """dnsmasq, an iperf3 server and sshd on the backend host (real, unmodified servers)."""
    pidf = os.path.join(WORK, "dnsmasq.pid")
    txt = ",".join(BIG_TXT)  # dnsmasq splits TXT strings at commas (quotes would be literal)
    procs["dnsmasq"] = {"proc": subprocess.Popen(nsx("backend", "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
        "--listen-address=" + BACKEND, "--bind-interfaces", "--port=53", "--user=root", "--pid-file=" + pidf,
        "--address=/web.test/10.9.9.9", "--txt-record=big.test," + txt, "--edns-packet-max=4096"),
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "dnsmasq.log"), "w")), "role": "", "host": "backend", "config": ""}
    procs["iperf3"] = {"proc": subprocess.Popen(nsx("backend", "iperf3", "-s", "-B", BACKEND, "-p", "5201"),
        stdout=open(os.path.join(WORK, "iperf3.log"), "w"), stderr=subprocess.STDOUT), "role": "", "host": "backend", "config": ""}
    os.makedirs("/run/sshd", exist_ok=True)
    hostkey, clientkey = os.path.join(WORK, "hostkey"), os.path.join(WORK, "clientkey")
    for k in [hostkey, clientkey]:
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k)
    auth = os.path.join(WORK, "authorized_keys")
    shutil.copy(clientkey + ".pub", auth)
    os.chmod(auth, 0o600)
    conf = os.path.join(WORK, "sshd_config")
    open(conf, "w").write(f"Port 22\nListenAddress {BACKEND}\nHostKey {hostkey}\nAuthorizedKeysFile {auth}\n"
                          f"PidFile {WORK}/sshd.pid\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
                          "PasswordAuthentication no\n"
                          "Subsystem sftp /usr/lib/openssh/sftp-server\n")
    procs["sshd"] = {"proc": subprocess.Popen(nsx("backend", shutil.which("sshd"), "-D", "-e", "-f", conf),
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "sshd.log"), "w")), "role": "", "host": "backend", "config": ""}


def random_file(path, mib):
    """Writes `mib` MiB of random bytes to `path`; their sha256 (hex)."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            h.update(chunk); f.write(chunk)
    return h.hexdigest()


def dig(name, *extra):
    return subprocess.run(nsx("agent", "dig", "@127.0.0.1", "-p", "5353", "+time=2", "+tries=2", *extra, name),
                          capture_output=True, text=True, timeout=30)


def probe_rows(out):
    return [(float(t), ok == "1", float(end) - float(t)) for t, end, ok in
            (l.split() for l in open(out).read().splitlines() if l.strip())]


def relay_ops_ready(name):
    return helper(name, "get", "9470", "/readyz")[0]


# ---------------------------------------------------------------------------------------------
def main():
    if os.geteuid() != 0:
        print("SKIP namespace suite: needs root"); return 0
    for tool in ["ip", "ss", "nft"]:
        if not shutil.which(tool):
            print(f"SKIP namespace suite: {tool} missing (apt-get install iproute2 nftables)"); return 0
    if not os.environ.get("ZTNA_BIN_DIR"):
        print("building release binaries", flush=True)
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "ztna-intermediate", "-p", "ztna-connector", "-p", "ztna-agent", "-p", "ztna-pki"], cwd=REPO, check=True)
    print(f"binaries: {BIN}", flush=True)
    missing = [t for t in ["dnsmasq", "dig", "iperf3", "sshd", "scp", "ssh-keygen"] if not shutil.which(t)]
    if missing:
        print(f"FAIL setup: real clients missing: {missing} (apt-get install dnsmasq dnsutils iperf3 openssh-server)")
        return 1
    setup()
    d, foreign = pki()
    policy = ('[[policy]]\nservice = "web"\nconnectors = ["spiffe://netns.test/connector/web-*"]\n'
              'agents = ["spiffe://netns.test/agent/alice", "spiffe://netns.test/agent/eve", "spiffe://netns.test/agent/old"]\n')
    for svc in ["dns", "iperf", "ssh"]:
        policy += f'[[policy]]\nservice = "{svc}"\nconnectors = ["spiffe://netns.test/connector/web-*"]\nagents = ["spiffe://netns.test/agent/alice"]\n'
    real_servers(d)
    for r in ["relay-a", "relay-b"]:
        cfg = write(r, f'listen = "0.0.0.0:4433"\nops_listen = "127.0.0.1:9470"\ndrain_timeout = "10s"\n{tls(d, r)}{policy}')
        start(r, "intermediate", r, cfg)
    backends = subprocess.Popen(nsx("backend", sys.executable, HELP, "backends-on", BACKEND, "7000", "7001"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs["backend"] = {"proc": backends, "role": "", "host": "backend", "config": ""}
    conn_cfg = write("connector", 'intermediates = ["%s:4433", "%s:4433"]\nops_listen = "127.0.0.1:9471"\n%s'
                     '[[service]]\nname = "web"\ntcp = "%s:7000"\nudp = "%s:7001"\n'
                     '[[service]]\nname = "dns"\nudp = "%s:53"\n'
                     '[[service]]\nname = "iperf"\ntcp = "%s:5201"\nudp = "%s:5201"\n'
                     '[[service]]\nname = "ssh"\ntcp = "%s:22"\n'
                     % (RELAY_FOR_CONNECTOR["relay-a"], RELAY_FOR_CONNECTOR["relay-b"], tls(d, "web-1"), BACKEND, BACKEND,
                        BACKEND, BACKEND, BACKEND, BACKEND))
    start("connector", "connector", "connector", conn_cfg)
    agent_head = 'intermediates = ["%s:4433", "%s:4433"]\nops_listen = "127.0.0.1:%%d"\n' % (RELAY_FOR_AGENT["relay-a"], RELAY_FOR_AGENT["relay-b"])
    fwd = '[[forward]]\nservice = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:%d"\n[[forward]]\nservice = "web"\nprotocol = "udp"\nlisten = "127.0.0.1:%d"\n'
    real_fwd = ('[[forward]]\nservice = "dns"\nprotocol = "udp"\nlisten = "127.0.0.1:5353"\n'
                '[[forward]]\nservice = "iperf"\nprotocol = "tcp"\nlisten = "127.0.0.1:5201"\n'
                '[[forward]]\nservice = "iperf"\nprotocol = "udp"\nlisten = "127.0.0.1:5201"\n'
                '[[forward]]\nservice = "ssh"\nprotocol = "tcp"\nlisten = "127.0.0.1:2222"\n'
                '[[forward]]\nservice = "web"\nprotocol = "udp"\nlisten = "%s:8083"\n' % AGENT_ON_LAN)
    start("agent", "agent", "agent", write("agent", (agent_head % 9472) + tls(d, "alice") + fwd % (8080, 8081) + real_fwd))
    if not connector_on(2) or not wait(lambda: helper("agent", "tcp", "8080")[0], 20):
        print("FAIL setup: the system did not come up"); [print(tail(k)) for k in procs]; return 1

    @case("1. TCP and UDP end to end, byte-exact")
    def c1():
        ok, out = helper("agent", "big", "8080", "1")
        assert ok, out
        ok2, out2 = helper("agent", "udpmany", "8081", "100", "INJECT")
        assert ok2, out2
        no_route = subprocess.run(nsx("agent", "ip", "route", "get", BACKEND), capture_output=True).returncode != 0
        assert no_route, "the agent host has a route to the backend"
        return f"1 MiB TCP: {out}; UDP: {out2}; the agent host has no route to the backend"
    c1()

    @case("2. injection at the connector is rejected")
    def c2():
        ports = re.findall(r"\S+:(\d+)\s+%s:7001" % re.escape(BACKEND), run(*nsx("connector", "ss", "-Hun", "state", "established")))
        assert ports, "no backend-facing UDP socket found at the connector"
        quic = re.findall(r"UNCONN\s+\d+\s+\d+\s+\S+:(\d+)\s+.*ztna-connector", run(*nsx("connector", "ss", "-Huanp")))
        before = {k: metric("connector", k) for k in ["ztna_connector_udp_rejected_total", "ztna_connector_udp_dropped_total", "ztna_connector_backend_errors_total"]}
        floods = [subprocess.Popen(nsx("connector", sys.executable, HELP, "flood", dst, ",".join(ports), "3000", "INJECT"))
                  for dst in ["127.0.0.1", "10.203.1.1"]]
        if quic:
            floods.append(subprocess.Popen(nsx("connector", sys.executable, HELP, "flood", "127.0.0.1", ",".join(quic), "2000")))
        ok, out = helper("agent", "udpmany", "8081", "200", "INJECT")
        for f in floods:
            f.wait(timeout=60)
        assert ok, out
        assert helper("agent", "tcp", "8080")[0], "TCP broken after the flood"
        after = {k: metric("connector", k) for k in before}
        return (f"backend-facing sockets {ports}, QUIC socket {quic}: 6000+ rogue datagrams per socket; {out}; "
                f"connector counters before/after {before} -> {after} (the connected sockets make the kernel drop "
                f"foreign datagrams before the connector reads them)")
    c2()

    @case("3. SIGKILL of the relay carrying the agent, under load: flows recover via the other relay")
    def c3():
        # The relay the agent uses now (it may have moved at startup, before the connector had
        # registered everywhere); killing that one is the case that matters.
        agents = {r: metric(r, "ztna_intermediate_connections", 'role="agent"') or 0 for r in ["relay-a", "relay-b"]}
        victim = max(agents, key=agents.get)
        assert agents[victim] == 1, f"agent connections per relay: {agents}"
        p, stop, out = probe_start("kill")
        time.sleep(1.5)
        t_kill = time.time()
        procs[victim]["proc"].send_signal(signal.SIGKILL)
        procs[victim]["proc"].wait(timeout=5)
        assert wait(lambda: helper("agent", "tcp", "8080")[0], 30), "flows never recovered"
        time.sleep(1)
        rows = probe_finish(p, stop, out)
        # The first flow that started after the kill, and how long users waited at worst.
        after = [(t, ok, dur) for t, ok, dur in rows if t > t_kill]
        recovered = max((t + dur) for t, ok, dur in after if ok and t <= after[0][0] + 0.001) - t_kill if after and after[0][1] else float("nan")
        worst = max((dur for t, ok, dur in rows if t > t_kill - 1), default=0.0)
        failed = sum(1 for t, ok, dur in rows if not ok)
        t_restart = time.time()
        assert restart_relay(victim), f"{victim} did not restart"
        assert connector_on(2), "connector not back on 2/2"
        back = time.time() - t_restart
        return (f"killed {victim} (the agent's relay): the first flow opened after SIGKILL completed "
                f"{recovered:.2f} s after it (slowest flow around the kill {worst:.2f} s), {failed} of {len(rows)} "
                f"probe flows failed; connector back on 2/2 {back:.2f} s after "
                f"{victim} restarted")
    c3()

    @case("4. rolling upgrade under continuous flows: 0 failed")
    def c4():
        p, stop, out = probe_start("rolling")
        time.sleep(1)
        figures = []
        for r in ["relay-a", "relay-b"]:
            t0 = time.time()
            procs[r]["proc"].send_signal(signal.SIGTERM)
            code = procs[r]["proc"].wait(timeout=30)
            drained = time.time() - t0
            assert code == 0, f"{r} exited {code}"
            assert restart_relay(r), f"{r} did not restart"
            assert connector_on(2), "connector not back on 2/2"
            figures.append(f"{r} drained in {drained:.2f} s, 2/2 {time.time() - t0:.2f} s after SIGTERM")
            time.sleep(1)
        rows = probe_finish(p, stop, out)
        failed = [t for t, ok, _ in rows if not ok]
        assert len(rows) > 50, f"only {len(rows)} flows"
        assert not failed, f"{len(failed)} of {len(rows)} flows failed"
        return f"{len(rows)} flows attempted, 0 failed; " + "; ".join(figures)
    c4()

    @case("5. link cut connector <-> relay-a: noticed, traffic via relay-b, restored")
    def c5():
        link = veth("connector", "relay-a")
        p, stop, out = probe_start("cut")
        time.sleep(1)
        t0 = time.time()
        run(*nsx("connector", "ip", "link", "set", link, "down"))
        t_cut = time.time()  # the link went down somewhere between t0 and t_cut
        assert wait(lambda: metric("connector", "ztna_connector_intermediates_connected") == 1, 20), "cut not noticed"
        noticed = time.time() - t0
        assert wait(lambda: helper("agent", "tcp", "8080")[0], 20), "no traffic during the cut"
        time.sleep(3)
        rows = probe_finish(p, stop, out)
        ok_after = [t for t, ok, _ in rows if ok and t > t0 + noticed]
        failed = [(t, d) for t, ok, d in rows if not ok]
        # The probe runs one flow at a time. A flow whose Accept had come back when the link went
        # down has had its request sent towards the backend: no tunnel can replay that (the
        # request may have been acted on), so it is reset, like a TCP connection over any path
        # that dies. Every other flow must succeed: one opened after the cut, or before Accept,
        # is retried via relay-b.
        in_flight = [(t, d) for t, d in failed if t < t_cut and t + d > t0]
        t1 = time.time()
        run(*nsx("connector", "ip", "link", "set", link, "up"))
        assert connector_on(2), "not back on 2/2 after the link came back"
        restored = time.time() - t1
        slowest = max(d for _, _, d in rows)
        assert noticed <= 8, f"noticed only after {noticed:.1f} s (idle timeout 5 s)"
        assert ok_after, "no successful flow after the cut was noticed"
        listed = ", ".join(f"started {t - t0:+.3f} s from the cut (which took {t_cut - t0:.3f} s), ended after {d:.3f} s"
                           for t, d in failed)
        assert len(in_flight) == len(failed) <= 1, f"{len(failed)} of {len(rows)} probe flows failed around the cut: {listed}"
        # ... and it is reset once relay-a gives the connector up, not left hanging.
        assert all(d < 8 for _, d in failed), f"a flow in flight at the cut hung: {listed}"
        cut_lines = [l for l in open(os.path.join(WORK, "agent.log")).read().splitlines() if "cut by the tunnel" in l]
        lost = (f"1 flow in flight at the cut was reset ({listed}), as any TCP connection over a path that dies; "
                f"the agent said: {cut_lines[-1].split(': ', 1)[-1] if cut_lines else 'nothing'}"
                if failed else "no flow was in flight at the cut")
        return (f"connector noticed the cut after {noticed:.2f} s (keepalive 1 s, idle timeout 5 s); "
                f"{len(rows) - len(failed)} of {len(rows)} probe flows completed around the cut (slowest {slowest:.2f} s: held by relay-a until it "
                f"gave the connector up, then retried via relay-b); {lost}; "
                f"2/2 again {restored:.2f} s after the link came back")
    c5()

    @case("6. hostile peers at the relay are refused, the legitimate agent is unaffected")
    def c6():
        before = metric("relay-a", "ztna_intermediate_handshakes_total", 'result="unauthorized"') or 0
        # Bad identities run as real agents, each on its own ports.
        bad = {
            "eve-foreign-ca": tls(foreign, "eve", d),
            "imposter-wrong-role": tls(d, "imposter"),
            "mallory-denied": tls(d, "mallory"),
        }
        for i, (key, t) in enumerate(bad.items()):
            start(key, "agent", "agent", write(key, (agent_head % (9300 + i)) + t + fwd % (8300 + 2 * i, 8301 + 2 * i)))
        time.sleep(4)
        flood_init = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([8]) + os.urandom(8) + os.urandom(1180)
        floods = [
            subprocess.Popen(nsx("agent", sys.executable, HELP, "flood", RELAY_FOR_AGENT["relay-a"], "4433", "3000")),
            subprocess.Popen(nsx("agent", sys.executable, HELP, "flood", RELAY_FOR_AGENT["relay-a"], "4433", "2000", "hex:" + flood_init.hex())),
        ]
        ok_during = helper("agent", "tcp", "8080")[0]
        for f in floods:
            f.wait(timeout=60)
        after = metric("relay-a", "ztna_intermediate_handshakes_total", 'result="unauthorized"') or 0
        logs = {k: open(os.path.join(WORK, k + ".log")).read() for k in bad}
        # Our agent checks its own certificate at start (as --check-config does) and refuses one
        # its CA did not issue; a crafted client with it is refused in the handshake (security.rs).
        assert any(m in logs["eve-foreign-ca"] for m in ["not issued by the CA in", "not issued by the deployment CA", "unknown CA"]), tail("eve-foreign-ca")
        assert "needs role agent" in logs["imposter-wrong-role"], tail("imposter-wrong-role")
        assert "policy does not allow" in logs["mallory-denied"], tail("mallory-denied")
        for r in ["relay-a", "relay-b", "connector", "agent"]:
            assert procs[r]["proc"].poll() is None, f"{r} died"
        assert ok_during and helper("agent", "tcp", "8080")[0], "legitimate agent affected"
        for k in bad:
            procs.pop(k)["proc"].kill()
        return (f"foreign-CA and wrong-role certificates refused at start, policy-denied agent told "
                f"'policy does not allow'; unauthorized handshakes at relay-a {before:.0f} -> {after:.0f}; 3000 garbage "
                f"and 2000 Initial-shaped datagrams: all daemons alive, legitimate flows kept working")
    c6()

    @case("7. 5% random loss on the agent's links: an 8 MiB transfer arrives intact")
    def c7():
        rules = "\n".join(
            f"add rule inet ztna_loss {hook} {dirn} \"{veth('agent', r)}\" numgen random mod 100 < 5 counter drop"
            for r in ["relay-a", "relay-b"] for hook, dirn in [("out", "oifname"), ("in", "iifname")])
        script = ("add table inet ztna_loss\n"
                  "add chain inet ztna_loss out { type filter hook output priority 0 ; }\n"
                  "add chain inet ztna_loss in { type filter hook input priority 0 ; }\n" + rules + "\n")
        path = os.path.join(WORK, "loss.nft")
        open(path, "w").write(script)
        run(*nsx("agent", "nft", "-f", path))
        try:
            ok, out = helper("agent", "big", "8080", "8", timeout=300)
            drops = run(*nsx("agent", "nft", "list", "table", "inet", "ztna_loss"))
            dropped = sum(int(x) for x in re.findall(r"packets (\d+)", drops))
        finally:
            run(*nsx("agent", "nft", "delete", "table", "inet", "ztna_loss"), check=False)
        assert ok, out
        assert dropped > 0, "the loss rules dropped nothing"
        return f"8 MiB: {out}; {dropped} packets dropped by the loss rules"
    c7()

    @case("8. UDP of any size: a DNS answer above 1412 bytes (dig + dnsmasq, EDNS) and 1472..65507-byte datagrams")
    def c8():
        r = dig("big.test", "TXT", "+bufsize=4096", "+ignore")
        assert r.returncode == 0, r.stderr + r.stdout
        flags = re.search(r";; flags: ([a-z ]+);", r.stdout)
        size = re.search(r"MSG SIZE\s+rcvd: (\d+)", r.stdout)
        answer = r.stdout.split("ANSWER SECTION:")[1] if "ANSWER SECTION:" in r.stdout else ""
        got = "".join(re.findall(r'"([^"]*)"', answer))
        assert flags and "tc" not in flags.group(1).split(), f"answer truncated: {r.stdout[:400]}"
        assert size and int(size.group(1)) > 1412, r.stdout[-300:]
        assert got == "".join(BIG_TXT), f"TXT answer incomplete ({len(got)} chars)"
        ok, out = helper("agent", "udpsizes", "8081", "1200,1472,8192,65507")
        assert ok, out
        return f"dig TXT answer of {size.group(1)} bytes over UDP, complete and not truncated; datagrams: {out.replace(chr(10), '; ')}"
    c8()

    @case("9. iperf3 UDP through the tunnel: its default datagram size, -l 1472 at 100 Mbit/s, -l 1200 at 1 Gbit/s")
    def c9():
        figures = []
        drops_before = metric("agent", "ztna_agent_udp_dropped_total") or 0
        for label, args, must in [("defaults", [], True), ("-l 1472 -b 100M", ["-l", "1472", "-b", "100M"], True),
                                  ("-l 1200 -b 1G", ["-l", "1200", "-b", "1G"], False)]:
            r = subprocess.run(nsx("agent", "iperf3", "-c", "127.0.0.1", "-p", "5201", "-u", "-t", "3", "-J", *args),
                               capture_output=True, text=True, timeout=60)
            try:
                j = json.loads(r.stdout)
            except ValueError:
                raise AssertionError(f"iperf3 {label}: {r.stdout[-300:]} {r.stderr[-300:]}")
            assert "error" not in j, f"iperf3 {label}: {j.get('error')}"
            sent, got = j["end"]["sum_sent"], j["end"]["sum_received"]
            blk = j["start"]["test_start"]["blksize"]
            share = got["bytes"] / sent["bytes"] if sent["bytes"] else 0.0
            figures.append(f"{label} ({blk}-byte datagrams): {got['bytes'] / 1e6:.1f} of {sent['bytes'] / 1e6:.1f} MB "
                           f"arrived ({100 * share:.1f} %), {sent['bits_per_second'] / 1e6:.1f} Mbit/s offered")
            if must:
                assert share >= 0.95, figures[-1]
        drops = (metric("agent", "ztna_agent_udp_dropped_total") or 0) - drops_before
        overflow = metric("agent", "ztna_agent_udp_dropped_total", 'reason="socket_overflow"')
        return "; ".join(figures) + f"; agent drops counted during the runs: {drops:.0f} (socket_overflow total {overflow})"
    c9()

    @case("10. rolling restart of both relays under dig every 50 ms and new TCP flows: 0 failed, drains < 2 s")
    def c10():
        dstop, dout = os.path.join(WORK, "dig.stop"), os.path.join(WORK, "dig.out")
        if os.path.exists(dstop):
            os.remove(dstop)
        dp = subprocess.Popen(nsx("agent", sys.executable, HELP, "digprobe", "5353", "web.test", dstop, dout))
        p, stop, out = probe_start("rolling2")
        time.sleep(1.5)
        figures, sigterms = [], []
        unknown = []
        for r in ["relay-a", "relay-b"]:
            # Datagrams a relay could not route since it started (a flow's first datagram that
            # beat its route would be one): read before the relay goes.
            unknown.append(metric(r, "ztna_intermediate_datagrams_dropped_total", 'reason="unknown_flow"') or 0)
            t0 = time.time()
            sigterms.append(f"{r} SIGTERM at {t0:.3f}")
            procs[r]["proc"].send_signal(signal.SIGTERM)
            code = procs[r]["proc"].wait(timeout=60)
            drained = time.time() - t0
            assert code == 0, f"{r} exited {code}"
            assert restart_relay(r), f"{r} did not restart"
            assert connector_on(2), "connector not back on 2/2"
            figures.append(f"{r} drained in {drained:.2f} s")
            time.sleep(1.5)
        open(dstop, "w").close()
        dp.wait(timeout=30)
        digs = probe_rows(dout)
        tcp = probe_finish(p, stop, out)
        dig_failed = sum(1 for _, ok, _ in digs if not ok)
        tcp_failed = sum(1 for _, ok, _ in tcp if not ok)
        slowest = max((d for _, _, d in digs), default=0)
        failed_at = [f"{t:.3f}" for t, ok, _ in digs if not ok] + [f"tcp {t:.3f}" for t, ok, _ in tcp if not ok]
        line = (f"{len(digs)} dig queries, {dig_failed} failed (slowest {slowest:.2f} s); {len(tcp)} TCP flows, "
                f"{tcp_failed} failed; " + "; ".join(figures)
                + f"; datagrams the relays could not route: {sum(unknown):.0f}"
                + (f"; failed ones started at {', '.join(failed_at)} ({', '.join(sigterms)})" if failed_at else ""))
        assert len(digs) > 20, line
        assert dig_failed == 0 and tcp_failed == 0, line
        for f in figures:
            assert float(f.split()[-2]) < 2.0, line
        return line
    c10()

    @case("11. lone relay: an agent whose only relay drained and returned is usable within 2 s; after kill -9, 5 s")
    def c11():
        start("solo", "agent", "agent", write("solo", 'intermediates = ["%s:4433"]\nops_listen = "127.0.0.1:9473"\n'
                                              % RELAY_FOR_AGENT["relay-a"] + tls(d, "alice") + fwd % (8090, 8091)))
        assert wait(lambda: helper("agent", "tcp", "8090")[0], 20), "solo agent never worked"
        figures = []
        for how, sig, down, limit in [("drain", signal.SIGTERM, 5, 2.0), ("kill -9", signal.SIGKILL, 8, 5.0)]:
            procs["relay-a"]["proc"].send_signal(sig)
            procs["relay-a"]["proc"].wait(timeout=60)
            time.sleep(down)
            start("relay-a", "intermediate", "relay-a", procs["relay-a"]["config"])
            assert wait(lambda: relay_ops_ready("relay-a"), 10, step=0.02), "relay-a did not come back"
            t_ready = time.time()
            ok = wait(lambda: helper("agent", "tcp", "8090")[0], 30, step=0.02)
            took = time.time() - t_ready
            figures.append(f"{how}, {down} s down: a flow through {took:.2f} s after the relay was ready")
            assert ok and took <= limit, "; ".join(figures)
        procs.pop("solo")["proc"].kill()
        assert connector_on(2), "connector not back on 2/2"
        return "; ".join(figures)
    c11()

    @case("12. policy reload round trip (SIGHUP): web taken from the connector on relay-a and given back, no reconnect")
    def c12():
        cfg = procs["relay-a"]["config"]
        orig = open(cfg).read()
        web_rule = 'service = "web"\nconnectors = ["spiffe://netns.test/connector/web-*"]'
        assert web_rule in orig
        reconnects = metric("connector", "ztna_connector_reconnects_total")
        open(cfg, "w").write(orig.replace(web_rule, 'service = "web"\nconnectors = ["spiffe://netns.test/connector/nobody"]', 1))
        t0 = time.time()
        procs["relay-a"]["proc"].send_signal(signal.SIGHUP)
        gone = wait(lambda: metric("relay-a", "ztna_intermediate_service_connectors", 'service="web"') == 0, 5, step=0.02)
        removed = time.time() - t0
        told = wait(lambda: "rejected" in helper("connector", "get", "9471", "/readyz")[1], 5)
        status = helper("connector", "get", "9471", "/readyz")[1].strip()
        open(cfg, "w").write(orig)
        t1 = time.time()
        procs["relay-a"]["proc"].send_signal(signal.SIGHUP)
        back = wait(lambda: metric("relay-a", "ztna_intermediate_service_connectors", 'service="web"') == 1, 10, step=0.02)
        restored = time.time() - t1
        after = metric("connector", "ztna_connector_reconnects_total")
        line = (f"removed in {removed:.2f} s (connector says: {status!r}); restored in {restored:.2f} s; "
                f"connector reconnects {reconnects:.0f} -> {after:.0f}")
        assert gone and told, line
        assert back and restored < 2.0, line
        assert after == reconnects, line
        assert helper("agent", "tcp", "8080")[0], "web broken after the round trip"
        return line
    c12()

    @case("13. a host firewall refusing the agent's answers to a local client: each counted as client_error "
          "and logged, the agent stays up, the flow answers once the rule is gone")
    def c13():
        def errors():
            return metric("agent", "ztna_agent_udp_dropped_total", 'reason="client_error"') or 0.0
        before = errors()
        # The agent host's firewall drops what the UDP forward sends to local clients: the
        # agent's send fails (EPERM), as under a host policy that blocks the port.
        path = os.path.join(WORK, "fw.nft")
        open(path, "w").write("add table inet ztna_fw\n"
                              "add chain inet ztna_fw out { type filter hook output priority 0 ; }\n"
                              "add rule inet ztna_fw out oifname \"lo\" udp sport 8081 counter drop\n")
        run(*nsx("agent", "nft", "-f", path))
        try:
            client = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(0.1)\n"
                      "got = 0\nfor i in range(20):\n    s.sendto(b'fw-%d' % i, ('127.0.0.1', 8081))\n"
                      "    try:\n        s.recvfrom(2048); got += 1\n    except OSError:\n        pass\nprint(got)")
            answered = int(run(*nsx("agent", sys.executable, "-c", client)).strip())
            wait(lambda: errors() - before >= 20, 5)
            n = errors() - before
            blocked = sum(int(x) for x in re.findall(r"packets (\d+)", run(*nsx("agent", "nft", "list", "table", "inet", "ztna_fw"))))
        finally:
            run(*nsx("agent", "nft", "delete", "table", "inet", "ztna_fw"), check=False)
        ok, out = helper("agent", "udpmany", "8081", "50", "INJECT")
        logged = "UDP datagram to the local client dropped: send failed" in tail("agent", 400)
        line = (f"20 datagrams from a new client: {answered} answered, {blocked} answers refused by the firewall, "
                f"{n:.0f} counted as client_error, logged at warn: {logged}; after the rule was removed: {out}")
        assert answered == 0, line
        assert blocked >= 10 and n == blocked, line
        assert logged, line
        assert procs["agent"]["proc"].poll() is None, "the agent exited"
        assert ok, line
        return line
    c13()

    def slow_link(daemon, link_to, flood_from, target, port, reason, warning):
        """A long queue (tbf, 8 Mbit/s, 64 MB) on `daemon`'s link to `link_to`: the UDP socket's send
        buffer fills before the queue does, so `daemon`'s sends would block. 20,000 datagrams of
        1200 B from `flood_from` to `target`:`port`; each send that would block must be counted as
        `reason` and logged (`warning`), and the flow must carry once the link is fast again."""
        def dropped():
            return metric(daemon, f"ztna_{daemon}_udp_dropped_total", f'reason="{reason}"') or 0.0
        link = veth(daemon, link_to)
        before = dropped()
        run(*nsx(daemon, "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", "8mbit",
                 "burst", "32kb", "limit", "64mb"))
        try:
            helper(flood_from, "flood", target, str(port), "20000", "F" * 1200, timeout=120)
            wait(lambda: dropped() - before >= 1000, 5)
            n = dropped() - before
        finally:
            run(*nsx(daemon, "tc", "qdisc", "del", "dev", link, "root"), check=False)
        ok, out = helper(flood_from, "udpmany", str(port), "50", "INJECT", target)
        logged = warning in tail(daemon, 400)
        line = (f"20,000 datagrams of 1200 B from one client: {n:.0f} counted as {reason}, logged at warn: {logged}; "
                f"after the link was fast again: {out}")
        assert n >= 1000, line
        assert logged, line
        assert procs[daemon]["proc"].poll() is None, f"the {daemon} exited"
        assert ok, line
        return line

    @case("14. a slow link to the backend (8 Mbit/s): datagrams the connector cannot hand to its full socket are "
          "counted as backend_busy and logged, the flow carries once the link is fast again")
    def c14():
        return slow_link("connector", "backend", "agent", "127.0.0.1", 8081, "backend_busy",
                         "UDP datagram to the backend dropped: socket buffer full")
    c14()

    @case("15. a slow link to a LAN client (8 Mbit/s): the agent's sends that would block are counted as "
          "client_busy and logged, the flow carries once the link is fast again")
    def c15():
        return slow_link("agent", "lan", "lan", AGENT_ON_LAN, 8083, "client_busy",
                         "UDP datagram to the local client dropped: the forward's send buffer is full")
    c15()

    @case("16. a bulk UDP flow on a congested 10 Mbit/s uplink leaves DNS on the same connection answered "
          "(iperf3 -u -b 40M -l 1200 beside dig every 50 ms): >= 95 % of the queries, median <= 400 ms")
    def c16():
        links = [veth("agent", r) for r in ["relay-a", "relay-b"]]
        dstop, dout = os.path.join(WORK, "dig16.stop"), os.path.join(WORK, "dig16.out")
        fair_before = metric("agent", "ztna_agent_udp_dropped_total", 'reason="send_buffer_full"') or 0
        # A short queue: the uplink drops what it cannot send, so QUIC's congestion control (not a
        # growing kernel queue) limits the connection, and its datagram buffer fills.
        for link in links:
            run(*nsx("agent", "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", "10mbit",
                     "burst", "16kb", "limit", "32kb"))
        if os.path.exists(dstop):
            os.remove(dstop)
        try:
            # iperf3's server takes one test at a time and may still be closing the last one.
            for _ in range(5):
                bulk = subprocess.Popen(nsx("agent", "iperf3", "-c", "127.0.0.1", "-p", "5201", "-u", "-b", "40M",
                                            "-l", "1200", "-t", "10", "-J"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                time.sleep(2.5)
                if bulk.poll() is None:
                    break
            assert bulk.poll() is None, f"iperf3 did not start: {bulk.communicate()[0][-300:]}"
            dp = subprocess.Popen(nsx("agent", sys.executable, HELP, "digprobe", "5353", "web.test", dstop, dout))
            time.sleep(6)
            open(dstop, "w").close()
            dp.wait(timeout=30)
            out, err = bulk.communicate(timeout=60)
        finally:
            for link in links:
                run(*nsx("agent", "tc", "qdisc", "del", "dev", link, "root"), check=False)
        try:
            j = json.loads(out)
        except ValueError:
            raise AssertionError(f"iperf3: {out[-300:]} {err[-300:]}")
        # iperf3 sometimes fails its end-of-test exchange ("unable to read from stream socket")
        # after a full run; its server's log still shows the run, and the agent's counter below
        # shows the congestion either way.
        iperf_error = j.get("error")
        sent = j.get("end", {}).get("sum_sent", {"bytes": 0, "bits_per_second": 0})
        got = j.get("end", {}).get("sum_received", {"bytes": 0, "bits_per_second": 0})
        digs = probe_rows(dout)
        answered = sum(1 for _, ok, _ in digs if ok)
        took = sorted(d for _, ok, d in digs if ok)
        median = took[len(took) // 2] if took else float("inf")
        slowest = max((d for _, _, d in digs), default=0)
        fair = (metric("agent", "ztna_agent_udp_dropped_total", 'reason="send_buffer_full"') or 0) - fair_before
        line = (f"{answered} of {len(digs)} dig queries answered (median {median * 1e3:.0f} ms, slowest {slowest:.2f} s) "
                f"while iperf3 offered {sent['bits_per_second'] / 1e6:.1f} Mbit/s and {got['bits_per_second'] / 1e6:.1f} "
                f"arrived; {fair:.0f} datagrams dropped at the agent as send_buffer_full"
                + (f" (iperf3 reported: {iperf_error})" if iperf_error else ""))
        # The path really was congested: the bulk flow lost most of what it offered (20,000 of
        # its datagrams at least, over 8.5 s at four times the path's rate).
        assert fair >= 20000, line
        assert iperf_error or got["bytes"] < 0.5 * sent["bytes"], line
        # Answered, and not after waiting behind the bulk flow's queue (a full 1 MiB datagram
        # buffer is 0.8 s at 10 Mbit/s: digs took 0.92 s each before the queue was kept short).
        assert answered >= 0.95 * len(digs), line
        assert median <= 0.4, line
        assert len(digs) >= 15, line
        return line
    c16()

    @case("17. an scp upload beside a bulk UDP flow on the same congested 10 Mbit/s uplink gets a fair part of it "
          "(iperf3 -u -b 40M -l 1200): >= 2.5 Mbit/s, the file intact")
    def c17():
        links = [veth("agent", r) for r in ["relay-a", "relay-b"]]
        src, dst = os.path.join(WORK, "up.bin"), os.path.join(WORK, "up-got.bin")
        want = random_file(src, 6)
        size = os.path.getsize(src)
        fair_before = metric("agent", "ztna_agent_udp_dropped_total", 'reason="send_buffer_full"') or 0
        for link in links:
            run(*nsx("agent", "tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", "10mbit",
                     "burst", "16kb", "limit", "32kb"))
        try:
            for _ in range(5):
                bulk = subprocess.Popen(nsx("agent", "iperf3", "-c", "127.0.0.1", "-p", "5201", "-u", "-b", "40M",
                                            "-l", "1200", "-t", "60"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                time.sleep(2.5)
                if bulk.poll() is None:
                    break
            assert bulk.poll() is None, f"iperf3 did not start: {bulk.communicate()[0][-300:]}"
            t0 = time.time()
            scp = subprocess.run(nsx("agent", "scp", "-q", "-P", "2222", "-i", os.path.join(WORK, "clientkey"),
                                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                     src, f"root@127.0.0.1:{dst}"),
                                 capture_output=True, text=True, timeout=90)
            took = time.time() - t0
            # The UDP flow kept the uplink congested for the whole upload.
            congested = bulk.poll() is None
            bulk.send_signal(signal.SIGINT)
            try:
                bulk.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                bulk.kill()
        finally:
            for link in links:
                run(*nsx("agent", "tc", "qdisc", "del", "dev", link, "root"), check=False)
        same = os.path.exists(dst) and hashlib.sha256(open(dst, "rb").read()).hexdigest() == want
        rate = size * 8 / took
        fair = (metric("agent", "ztna_agent_udp_dropped_total", 'reason="send_buffer_full"') or 0) - fair_before
        line = (f"scp uploaded {size / 1048576:.0f} MiB in {took:.1f} s ({rate / 1e6:.2f} Mbit/s of the 10) beside iperf3 -u "
                f"at 40 Mbit/s; sha256 {'match' if same else 'MISMATCH'}; {fair:.0f} datagrams dropped at the agent "
                f"as send_buffer_full")
        assert scp.returncode == 0 and same, f"{line}; scp exit {scp.returncode} {scp.stderr.strip()!r}"
        assert congested, f"{line}: iperf3 ended before the upload did"
        assert fair >= 5000, f"{line}: the uplink was not congested by the UDP flow"
        # Datagrams and stream data take turns in packets: about half the path each. Packed
        # datagrams-first (upstream quinn) the upload got a seventh.
        assert rate >= 2.5e6, line
        return line
    c17()

    # Last: it stops the agent.
    @case("18. agent SIGTERM during an scp download: the transfer completes intact, the agent exits 0")
    def c18():
        src, dst = os.path.join(WORK, "big.bin"), os.path.join(WORK, "got.bin")
        want = random_file(src, 64)
        scp = subprocess.Popen(nsx("agent", "scp", "-q", "-P", "2222", "-i", os.path.join(WORK, "clientkey"),
                                   "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                   "-l", "150000", f"root@127.0.0.1:{src}", dst),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait(lambda: os.path.exists(dst) and os.path.getsize(dst) > (1 << 20), 30, step=0.05), "scp never started"
        t0 = time.time()
        at = os.path.getsize(dst)
        procs["agent"]["proc"].send_signal(signal.SIGTERM)
        _, err = scp.communicate(timeout=120)
        took = time.time() - t0
        code = procs["agent"]["proc"].wait(timeout=60)
        same = hashlib.sha256(open(dst, "rb").read()).hexdigest() == want
        line = (f"SIGTERM at {at / 1048576:.1f} of 64 MiB; scp exit {scp.returncode} {err.strip()!r}, "
                f"finished {took:.2f} s later, sha256 {'match' if same else 'MISMATCH'}; agent exit {code}")
        assert scp.returncode == 0 and same, line
        assert code == 0, line
        return line
    c18()

    print()
    print(f"netns: {sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    try:
        code = main()
    finally:
        teardown()
        if os.environ.get("ZTNA_NETNS_KEEP"):
            print(f"logs kept in {WORK} (ZTNA_NETNS_KEEP)")
        else:
            shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(code)
