#!/usr/bin/env python3
"""TCP transfer for the nixosTests.

  transfer.py PORT MIB
      Sends MIB MiB of random bytes to 127.0.0.1:PORT (an agent's local port in front of an
      echo backend) while reading the echo, and compares SHA-256 of what was sent and what came
      back. Prints the figures; exits 1 on any difference.
"""
import hashlib, os, socket, sys, threading, time


def main(port, mib):
    data = os.urandom(mib << 20)
    want = hashlib.sha256(data).hexdigest()
    start = time.time()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)

    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    h, n = hashlib.sha256(), 0
    while True:
        d = s.recv(1 << 16)
        if not d:
            break
        h.update(d)
        n += len(d)
    t.join()
    secs = time.time() - start
    same = n == len(data) and h.hexdigest() == want
    print(f"{n} of {len(data)} bytes back in {secs:.2f} s, sha256 {'match' if same else 'MISMATCH'}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]), int(sys.argv[2])) else 1)
