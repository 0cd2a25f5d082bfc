#!/usr/bin/env python3
"""UDP helpers for the nixosTests.

  udp.py hold HOST PORT DIR
      One UDP flow kept open: sends "open", waits for its echo (then writes DIR/ready), and
      appends every datagram it receives, one per line, to DIR/received until DIR/stop exists.
  udp.py inject SRC SPORT DST DPORT[,DPORT...] PAYLOAD COUNT
      COUNT datagrams to each DST:DPORT with a forged source SRC:SPORT (raw socket, IP header
      written here), as an attacker on the backend's network could send them.
"""
import os, socket, struct, sys, time


def hold(host, port, d):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    s.settimeout(0.5)
    out = open(os.path.join(d, "received"), "a", buffering=1)
    echoed = False
    for _ in range(40):
        s.send(b"open")
        try:
            out.write(s.recv(65535).decode(errors="replace") + "\n")
            echoed = True
            break
        except socket.timeout:
            continue
    open(os.path.join(d, "ready"), "w").write("ready\n" if echoed else "no echo\n")
    while not os.path.exists(os.path.join(d, "stop")):
        try:
            out.write(s.recv(65535).decode(errors="replace") + "\n")
        except socket.timeout:
            pass


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def inject(src, sport, dst, dports, payload, count):
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    data = payload.encode()
    for dport in [int(p) for p in dports.split(",")]:
        length = 8 + len(data)
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
        c = checksum(pseudo + struct.pack("!HHHH", int(sport), dport, length, 0) + data) or 0xFFFF
        udp = struct.pack("!HHHH", int(sport), dport, length, c) + data
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        for _ in range(int(count)):
            raw.sendto(ip + udp, (dst, 0))
            time.sleep(0.001)


if __name__ == "__main__":
    {"hold": hold, "inject": inject}[sys.argv[1]](*sys.argv[2:])
