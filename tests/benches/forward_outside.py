#!/usr/bin/env python3
"""Forwarding measured from outside, as a user sees it: two real `dshare serve` processes (the
configurations `dshare dev-cluster --nodes 2` writes: office-a on 127.0.0.1, office-b on
127.0.0.2), Python's poplib and imaplib as the clients, bob's mailbox on office-b.

    cargo build --release -p dshare
    python3 tests/benches/forward_outside.py [--rounds 21] [--dshare target/release/dshare]

Each figure is a whole client session (connect, log in, work, log out), direct on the owner
(127.0.0.2) and through the forwarding node (127.0.0.1) in turn, so a change in the machine's
speed hits both alike; printed are the medians, their ratio, the median of the per-pair ratios,
and the CPU time each node's process used per session (from /proc):

- download: 100 messages of 100 KiB, POP3 (RETR one by one, like poplib) and IMAP
  (`FETCH 1:* BODY.PEEK[]`), plain and over implicit TLS;
- login cycle: POP3 USER/PASS/STAT/QUIT and IMAP LOGIN/SELECT/FETCH 1 FLAGS/LOGOUT.

The dev-cluster's fixed ports (1110, 1143, 1993, 1995, 2525, ...) must be free.
"""

import argparse
import imaplib
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

DIRECT, FORWARDED = "127.0.0.2", "127.0.0.1"
MESSAGES, SIZE = 100, 100 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(host, port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{host}:{port} never answered")


def start_cluster(dshare, data):
    # dev-cluster writes the CA, certificates, configurations and demo accounts, then serves;
    # it is stopped once it has, and each node is started as its own process.
    dev = subprocess.Popen(
        [dshare, "dev-cluster", "--nodes", "2", "--data-dir", data],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in dev.stdout:
        if line.startswith("Domain Share dev cluster"):
            break
    dev.send_signal(signal.SIGTERM)
    dev.wait(timeout=30)
    nodes = {}
    for name in ("office-a", "office-b"):
        nodes[name] = subprocess.Popen(
            [dshare, "-c", f"{data}/{name}/node.toml", "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    for host in (FORWARDED, DIRECT):
        for port in (1110, 1143, 1993, 1995, 2525):
            wait_port(host, port)
    return nodes


def fill():
    line = "x" * 76 + "\r\n"
    body = line * (SIZE // len(line))
    with smtplib.SMTP(DIRECT, 2525) as s:
        for n in range(MESSAGES):
            s.sendmail(
                "alice@example.com",
                ["bob@example.com"],
                f"Subject: message {n}\r\nFrom: alice@example.com\r\n\r\n{body}",
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--dshare", default="target/release/dshare")
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="dshare-forward-")
    nodes = start_cluster(args.dshare, data)
    try:
        run(args.rounds, data, {n: p.pid for n, p in nodes.items()})
    finally:
        for p in nodes.values():
            p.terminate()
        for p in nodes.values():
            p.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def run(rounds, data, pids):
    fill()
    ctx = ssl.create_default_context(cafile=f"{data}/ca.pem")
    ctx.check_hostname = False

    def pop(host, tls):
        p = poplib.POP3_SSL(host, 1995, context=ctx) if tls else poplib.POP3(host, 1110)
        p.user("bob")
        p.pass_("demo-password")
        n, _ = p.stat()
        got = sum(p.retr(i)[2] for i in range(1, n + 1))
        p.quit()
        assert n == MESSAGES and got > MESSAGES * SIZE * 0.9, (n, got)

    def imap(host, tls):
        m = imaplib.IMAP4_SSL(host, 1993, ssl_context=ctx) if tls else imaplib.IMAP4(host, 1143)
        m.login("bob", "demo-password")
        m.select("INBOX", readonly=True)
        _, data = m.fetch("1:*", "(BODY.PEEK[])")
        got = sum(len(d[1]) for d in data if isinstance(d, tuple))
        m.logout()
        assert got > MESSAGES * SIZE * 0.9, got

    def pop_login(host, tls):
        p = poplib.POP3_SSL(host, 1995, context=ctx) if tls else poplib.POP3(host, 1110)
        p.user("bob")
        p.pass_("demo-password")
        p.stat()
        p.quit()

    def imap_login(host, tls):
        m = imaplib.IMAP4_SSL(host, 1993, ssl_context=ctx) if tls else imaplib.IMAP4(host, 1143)
        m.login("bob", "demo-password")
        m.select("INBOX", readonly=True)
        m.fetch("1", "(FLAGS)")
        m.logout()

    print(f"forward_outside: {MESSAGES} x {SIZE // 1024} KiB, {rounds} rounds per figure")
    for label, work, repeat in [
        ("pop3 download", pop, 1),
        ("imap download", imap, 1),
        ("pop3 login cycle", pop_login, 20),
        ("imap login cycle", imap_login, 20),
    ]:
        for tls in (False, True):
            times = {DIRECT: [], FORWARDED: []}
            used = {DIRECT: [0.0, 0.0], FORWARDED: [0.0, 0.0]}
            for r in range(rounds + 1):
                for host in (DIRECT, FORWARDED):
                    a, b = cpu(pids["office-a"]), cpu(pids["office-b"])
                    start = time.perf_counter()
                    for _ in range(repeat):
                        work(host, tls)
                    elapsed = (time.perf_counter() - start) / repeat
                    if r:  # the first round warms up
                        times[host].append(elapsed)
                        used[host][0] += cpu(pids["office-a"]) - a
                        used[host][1] += cpu(pids["office-b"]) - b
            d, f = statistics.median(times[DIRECT]), statistics.median(times[FORWARDED])
            pairs = statistics.median(y / x for x, y in zip(times[DIRECT], times[FORWARDED]))
            per = rounds * repeat / 1000
            print(
                f"{label:<17} {'tls  ' if tls else 'plain'}"
                f"  direct {d * 1000:7.2f} ms  forwarded {f * 1000:7.2f} ms"
                f"  ratio {f / d:.3f} (pairs {pairs:.3f})"
                f"  cpu/session: direct owner {used[DIRECT][1] / per:5.2f} ms,"
                f" forwarded front {used[FORWARDED][0] / per:5.2f} + owner {used[FORWARDED][1] / per:5.2f} ms"
            )


if __name__ == "__main__":
    main()
