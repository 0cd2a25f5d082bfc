#!/usr/bin/env python3
"""Small network helpers for the systemd suite (host side; the container shares the host's
network namespace): echo backends, round trips, a held flow, a load loop, HTTP GET."""
import socket, sys, threading, time, urllib.request, os


def echo_backends(tcp_port, udp_port, host="127.0.0.1"):
    def tcp():
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, tcp_port)); s.listen(128)
        while True:
            c, _ = s.accept()
            def serve(c=c):
                try:
                    while (d := c.recv(65536)):
                        c.sendall(d)
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                c.close()
            threading.Thread(target=serve, daemon=True).start()
    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, udp_port))
        while True:
            d, a = s.recvfrom(65536); s.sendto(d, a)
    threading.Thread(target=tcp, daemon=True).start()
    threading.Thread(target=udp, daemon=True).start()
    while True:
        time.sleep(3600)


def tcp_roundtrip(port, msg=b"hello through ztna"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(msg); s.shutdown(socket.SHUT_WR)
        out = b""
        while (d := s.recv(65536)):
            out += d
    return out == msg


def udp_roundtrip(port, msg=b"udp through ztna"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
    for _ in range(20):
        s.sendto(msg, ("127.0.0.1", port))
        try:
            d, _ = s.recvfrom(65536)
            return d == msg
        except socket.timeout:
            continue
    return False


def hold(port, go_file, result_file):
    """Opens a flow, proves it works, waits until go_file exists, proves it still works."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"1"); ok1 = s.recv(1) == b"1"
    open(result_file + ".open", "w").write("open")
    while not os.path.exists(go_file):
        time.sleep(0.05)
    try:
        s.sendall(b"2"); ok2 = s.recv(1) == b"2"
    except OSError:
        ok2 = False
    open(result_file, "w").write("ok" if ok1 and ok2 else "broken")
    s.close()


def load(port, stop_file, result_file):
    attempts = failures = 0
    while not os.path.exists(stop_file):
        attempts += 1
        try:
            if not tcp_roundtrip(port, b"load %d" % attempts):
                failures += 1
        except OSError:
            failures += 1
        time.sleep(0.02)
    open(result_file, "w").write(f"{attempts} {failures}")


def big(port, mib):
    """Sends `mib` MiB of pseudo-random bytes through an echo and compares SHA-256 both ways."""
    import hashlib, random
    rnd = random.Random(7)
    data = rnd.randbytes(mib * 1024 * 1024)
    want = hashlib.sha256(data).hexdigest()
    start = time.time()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    def send():
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    h = hashlib.sha256(); n = 0
    while (d := s.recv(1 << 16)):
        h.update(d); n += len(d)
    t.join()
    secs = time.time() - start
    print(f"{n} bytes in {secs:.2f} s ({n / secs / 1048576:.1f} MiB/s), sha256 {'match' if h.hexdigest() == want else 'MISMATCH'}")
    return n == len(data) and h.hexdigest() == want


def udp_many(port, count, marker, host="127.0.0.1"):
    """`count` UDP round trips; fails if any reply is not ours (e.g. contains `marker`)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.connect((host, port))
    ok = 0
    for i in range(count):
        msg = b"legit-%d" % i
        for _ in range(5):
            s.send(msg)
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            if marker.encode() in d:
                print(f"injected datagram reached the client: {d[:40]!r}"); return False
            if d == msg:
                ok += 1; break
    print(f"{ok}/{count} legit round trips")
    return ok == count


def flood(host, ports, count, payload):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(count):
        for p in ports:
            try:
                s.sendto(payload if payload else os.urandom(1200), (host, p))
            except OSError:
                pass
        if i % 200 == 0:
            time.sleep(0.005)


def probe(port, stop_file, out_file):
    """New TCP flows every 50 ms; writes `start end ok` lines."""
    with open(out_file, "w") as out:
        i = 0
        while not os.path.exists(stop_file):
            i += 1
            t = time.time()
            try:
                ok = tcp_roundtrip(port, b"probe %d" % i)
            except OSError:
                ok = False
            out.write(f"{t:.3f} {time.time():.3f} {1 if ok else 0}\n"); out.flush()
            time.sleep(0.05)


def dig_probe(port, name, stop_file, out_file):
    """A DNS query every 50 ms with dig (one try, 1 s timeout); writes `start end ok` lines."""
    import subprocess
    with open(out_file, "w") as out:
        while not os.path.exists(stop_file):
            t = time.time()
            r = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short", name],
                               capture_output=True, text=True)
            ok = r.returncode == 0 and r.stdout.strip() != ""
            out.write(f"{t:.3f} {time.time():.3f} {1 if ok else 0}\n"); out.flush()
            time.sleep(0.05)


def udp_sizes(port, sizes):
    """Echoes one datagram of each size; prints what came back."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.connect(("127.0.0.1", port))
    ok = True
    for n in sizes:
        msg = bytes((i * 7 + n) % 256 for i in range(n))
        got = None
        for _ in range(3):
            s.send(msg)
            try:
                got = s.recv(65536)
                break
            except socket.timeout:
                continue
        good = got == msg
        ok &= good
        print(f"{n} bytes: {'echoed intact' if good else ('lost' if got is None else f'got {len(got)} bytes')}")
    return ok


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "backends":
        echo_backends(int(args[0]), int(args[1]))
    elif cmd == "tcp":
        sys.exit(0 if tcp_roundtrip(int(args[0])) else 1)
    elif cmd == "udp":
        sys.exit(0 if udp_roundtrip(int(args[0])) else 1)
    elif cmd == "hold":
        hold(int(args[0]), args[1], args[2])
    elif cmd == "load":
        load(int(args[0]), args[1], args[2])
    elif cmd == "backends-on":
        echo_backends(int(args[1]), int(args[2]), args[0])
    elif cmd == "big":
        sys.exit(0 if big(int(args[0]), int(args[1])) else 1)
    elif cmd == "udpmany":
        sys.exit(0 if udp_many(int(args[0]), int(args[1]), args[2], *args[3:4]) else 1)
    elif cmd == "flood":
        payload = None
        if len(args) > 3:
            payload = bytes.fromhex(args[3][4:]) if args[3].startswith("hex:") else args[3].encode()
        flood(args[0], [int(p) for p in args[1].split(",") if p], int(args[2]), payload)
    elif cmd == "probe":
        probe(int(args[0]), args[1], args[2])
    elif cmd == "digprobe":
        dig_probe(int(args[0]), args[1], args[2], args[3])
    elif cmd == "udpsizes":
        sys.exit(0 if udp_sizes(int(args[0]), [int(x) for x in args[1].split(",")]) else 1)
    elif cmd == "get":
        code, body = get(int(args[0]), args[1])
        print(body, end="")
        sys.exit(0 if code == 200 else 1)
    elif cmd == "metric":
        # metric PORT NAME [LABEL]: the first series of NAME (with LABEL, e.g. role="connector").
        code, body = get(int(args[0]), "/metrics")
        for line in body.splitlines():
            if (line.startswith(args[1] + " ") or line.startswith(args[1] + "{")) \
                    and (len(args) < 3 or args[2] in line):
                print(line.rsplit(" ", 1)[1]); break
