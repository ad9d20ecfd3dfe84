#!/usr/bin/env python3
"""The benchmark: letterbox against Postfix and smtp-sink, same loads, one run.

Every load is driven by Postfix's smtp-source, one process per session, so
each session has mailboxes of its own (smtp-source's -s would send every
session to the same address). Servers run one after another inside each
repetition (A B C A B C …), so drift of the machine cancels out of the
ratios. The clock starts before the first smtp-source starts and stops when
the last copy is in a new/ directory (maildir servers) or the last session
has its 250 (sinks). After the clock, every copy is checked: the right
number in each mailbox, each one's body identical to what was sent.

bench/run.sh sets the machine up and calls this; see README.md, Benchmarks.
"""

import argparse
import errno
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DOMAIN = "bench.test"
SINK_DOMAIN = "s.sink.bench.test"
USERS = 1000
POSTFIX_PORT = 2526
# Long enough for the slowest server on the largest load, short enough that
# a wedged run fails the benchmark instead of hanging it.
RUN_TIMEOUT = 600


@dataclass(frozen=True)
class Load:
    sessions: int
    size: int
    rcpts: int
    messages: int  # in total, across sessions

    @property
    def name(self):
        size = f"{self.size // 1024}K"
        return f"{self.sessions}s-{size}-{self.rcpts}r"


def loads(quick):
    """The matrix: 1, 20 and 100 sessions; 4 KiB and 256 KiB; 1 and 5
    recipients. Message counts keep each run to a few seconds for letterbox
    and well under a minute for Postfix."""
    out = []
    for sessions in (1, 20, 100):
        for size in (4096, 256 * 1024):
            for rcpts in (1, 5):
                if size == 4096:
                    n = {1: 1000, 20: 6000, 100: 6000}[sessions]
                else:
                    n = {1: 200, 20: 1000, 100: 1000}[sessions]
                if rcpts == 5:
                    n //= 5
                if quick:
                    n = max(sessions, n // 4)
                n -= n % sessions
                out.append(Load(sessions, size, rcpts, n))
    return out


def recipients(session, rcpts, domain):
    """The addresses smtp-source sends to for `-t <session>@domain -r N`:
    N<to>, …, 2<to>, <to>."""
    base = str(session)
    return [base] + [f"{k}{base}" for k in range(2, rcpts + 1)]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------- graveyard


class Graveyard:
    """Where the copies of finished runs go: renamed, not deleted, until the
    whole benchmark is over.

    ext4 without a journal (this machine's root filesystem) will not reuse
    an inode freed in the last minute, or the last six while its inode
    table block is dirty (as it stays while new inodes go into the same
    block group): each new inode is found by walking past every such inode
    of its group (`recently_deleted()` in fs/ext4/ialloc.c). Deleting one
    run's 6,000 copies made every create of the next runs pay for that
    walk: the disk ceiling at 20 writers fell from about 8,800 to 2,500
    copies/s, all of it kernel CPU. A server that frees inodes as it works
    (Postfix deletes each queue file) still pays for its own; what the
    harness frees must not be charged to anyone."""

    QUIET = 365  # the kernel's RECENTCY_MIN + RECENTCY_DIRTY (60 + 300 s), and a margin

    def __init__(self, path):
        self.path = path
        self.stamp = path.with_name(path.name + ".freed")
        # Names unique across runs: a run that failed leaves its graveyard
        # for the next one that completes to empty.
        self.prefix = f"{time.time_ns()}-"
        self.n = 0

    def check_room(self, todo, reps, maildir_servers):
        """Every copy of the benchmark stays on disk until its end."""
        need = sum(l.messages * l.rcpts * (l.size + 1024) for l in todo) * reps * maildir_servers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path.parent).free
        if free < need * 1.2:
            raise SystemExit(f"the benchmark keeps about {need / 2**30:.1f} GiB of copies under "
                             f"{self.path.parent} until it ends; only {free / 2**30:.1f} GiB are free "
                             "(fewer loads with --loads, or --quick, need less)")

    def wait_for_last(self):
        """A run right after another would walk that one's freed inodes."""
        try:
            age = time.time() - self.stamp.stat().st_mtime
        except FileNotFoundError:
            return
        if age < self.QUIET:
            print(f"waiting {self.QUIET - age:.0f} s for the inodes the last benchmark freed "
                  "to age (see Graveyard)", flush=True)
            time.sleep(self.QUIET - age)

    def bury(self, path):
        """Moves a file or a whole tree out of the way, on the same filesystem."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.n += 1
        try:
            os.rename(path, self.path / f"{self.prefix}{self.n}")
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)

    def empty(self):
        """Frees everything, once no run is left to measure."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.stamp.touch()


GRAVEYARD = None  # set by main()


# ---------------------------------------------------------------- servers


class Server:
    name = ""
    maildir = True  # copies land in <root>/<domain>/<n>/new

    def start(self):
        pass

    def stop(self):
        pass

    def port(self):
        raise NotImplementedError

    def domain(self):
        return DOMAIN

    def root(self):
        raise NotImplementedError

    def clear(self):
        """Empty every mailbox, outside the clock, keeping the maildirs."""
        if not self.maildir:
            return
        d = self.root() / DOMAIN
        if d.exists():
            for mbox in d.iterdir():
                for sub in ("new", "cur", "tmp"):
                    p = mbox / sub
                    if p.exists():
                        for f in os.scandir(p):
                            GRAVEYARD.bury(f.path)

    def rss_peak(self):
        return None


def vm(pid, key):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None


# Postfix beside it checks no sender either, and the bench has no DNS
# unless --auth-dns gives one. An earlier binary (--baseline) has no
# [auth] to turn off: it gets "".
AUTH_OFF = '[auth]\nspf = "off"\ndkim = "off"\ndmarc = "off"\narc = "off"\n'


class Letterbox(Server):
    def __init__(self, binary, work, db_url, label, sink=False, extra="", auth=AUTH_OFF):
        self.binary, self.work, self.db_url = binary, work, db_url
        self.name, self.sink = label, sink
        self.maildir = not sink
        self.proc = None
        self.smtp = None
        self.http = None
        self.config = work / "letterbox.toml"
        self.work.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"""hostname = "mx.bench.test"
[database]
url = "{db_url}"
[smtp]
listen = ["127.0.0.1:0"]
max_connections = 20000
# Every session of the benchmark comes from 127.0.0.1.
max_connections_per_ip = 20000
reverse_dns = false
[maildir]
root = "{work / 'mail'}"
[sink]
enabled = true
http_listen = "127.0.0.1:0"
[log]
level = "warn"
{auth}{extra}"""
        )

    def cli(self, *args, stdin=None):
        run([self.binary, "--config", self.config, *args], stdout=subprocess.DEVNULL, input=stdin)

    def provision(self):
        """Domain, 1,000 users and the sink rule, all through the CLI."""
        self.cli("migrate")
        existing = subprocess.run(
            [self.binary, "--config", self.config, "user", "list", "--json"],
            check=True, capture_output=True, text=True).stdout
        if len(json.loads(existing)) >= USERS:
            return
        self.cli("domain", "add", DOMAIN)
        self.cli("sink", "add", "*.sink.bench.test", "--ttl", "10m")
        # Two at a time: the machine has two cores.
        args = "\n".join(f"{i}@{DOMAIN}" for i in range(USERS))
        run(["xargs", "-P", "2", "-I{}", str(self.binary), "--config", str(self.config),
             "user", "add", "{}"], input=args.encode(), stdout=subprocess.DEVNULL)

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "--config", self.config, "serve"],
            stdout=subprocess.PIPE, stderr=open(self.work / "serve.log", "ab"), text=True)
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("letterbox: smtp listening on "):
                self.smtp = int(line.rsplit(":", 1)[1])
            elif line.startswith("letterbox: sink web page on "):
                self.http = line.rsplit(" ", 1)[1].rstrip("/")
            elif line == "letterbox: ready":
                break
        if self.smtp is None:
            raise SystemExit(f"letterbox did not start; see {self.work / 'serve.log'}")

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def port(self):
        return self.smtp

    def domain(self):
        return SINK_DOMAIN if self.sink else DOMAIN

    def root(self):
        return self.work / "mail"

    def rss_peak(self):
        return vm(self.proc.pid, "VmHWM")

    def rss(self):
        return vm(self.proc.pid, "VmRSS")


class Postfix(Server):
    name = "postfix"

    def __init__(self, base):
        self.base = base

    def start(self):
        run(["postfix", "start"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(POSTFIX_PORT)

    def stop(self):
        # Drain nothing: the clock has stopped and every copy was counted.
        run(["postfix", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def port(self):
        return POSTFIX_PORT

    def root(self):
        return self.base

    def rss_peak(self):
        return None  # many processes; sampled by Sampler instead


class SmtpSink(Server):
    name = "smtp-sink"
    maildir = False

    def start(self):
        self.sock_port = free_port()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", f"127.0.0.1:{self.sock_port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.sock_port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def port(self):
        return self.sock_port

    def rss_peak(self):
        return vm(self.proc.pid, "VmHWM")


class Disk(Server):
    """No server: bench/fsync_ceiling.rs doing the filesystem work of each
    copy from one thread per session. Its rate is what the disk allowed
    durable delivery at that moment, the ceiling for the maildir servers.
    Run on 1-recipient loads only: letterbox syncs the copies of a
    transaction side by side, which this does not model."""
    name = "disk"

    def __init__(self, binary, work):
        self.binary, self.work = binary, work

    def root(self):
        return self.work

    def run(self, load):
        self.clear()
        os.sync()
        cpu0 = cpu_busy()
        out = subprocess.run(
            [self.binary, "--root", self.work, "--writers", str(load.sessions),
             "--copies", str(load.messages), "--size", str(load.size)],
            check=True, capture_output=True, text=True).stdout
        cpu = cpu_busy() - cpu0
        secs = float(out)
        mailboxes = {str(s): load.messages // load.sessions for s in range(load.sessions)}
        for m, want in mailboxes.items():
            sizes = [f.stat().st_size for f in os.scandir(self.work / DOMAIN / m / "new")]
            if sizes != [load.size] * want:
                raise SystemExit(f"disk {load.name}: mailbox {m} holds {len(sizes)} copies, not {want}")
        return Result(self.name, load, secs, secs, cpu_s=cpu)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=15):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def postfix_rss():
    """Sum of RSS over Postfix's processes (master, smtpd, cleanup, qmgr,
    virtual…): its memory is spread across them."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if exe.startswith("/usr/lib/postfix/"):
            total += vm(pid, "VmRSS") or 0
    return total


# ---------------------------------------------------------------- one run


@dataclass
class Result:
    server: str
    load: Load
    accepted_s: float  # until every session had its last 250
    delivered_s: float  # until the last copy was in new/
    rss_peak: int | None = None
    cpu_s: float = 0.0  # busy CPU time of the whole machine over the run
    # Submission runs: connections the queue opened to the destination,
    # CPU time of the server's processes (Postfix: with its Dovecot and
    # OpenDKIM; letterbox: with the DNS server it asks) and of submit_load.
    sink_connections: int | None = None
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None

    @property
    def msgs_per_s(self):
        return self.load.messages / self.delivered_s


def cpu_busy():
    """Seconds of CPU the whole machine has spent busy (not idle or waiting
    for I/O) since boot: the server, its helpers and smtp-source together."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def count_new(root, mailboxes):
    n = 0
    for m in mailboxes:
        try:
            n += sum(1 for _ in os.scandir(root / DOMAIN / m / "new"))
        except FileNotFoundError:
            pass
    return n


def one_run(server, load, payload_digest):
    if isinstance(server, Disk):
        return server.run(load)
    server.clear()
    # Start from a clean disk: no run pays for the writeback of the one
    # before it (this filesystem's fsync cost swings with dirty data).
    os.sync()
    per_session = load.messages // load.sessions
    mailboxes = {}
    for s in range(load.sessions):
        for r in recipients(s, load.rcpts, DOMAIN):
            mailboxes[r] = mailboxes.get(r, 0) + per_session
    expected = load.messages * load.rcpts
    peak_rss = 0
    cpu0 = cpu_busy()
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            ["smtp-source", "-l", str(load.size), "-m", str(per_session), "-r", str(load.rcpts),
             "-f", "sender@client.test", "-t", f"{s}@{server.domain()}", "-M", "client.test",
             f"127.0.0.1:{server.port()}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for s in range(load.sessions)
    ]
    for p in procs:
        _, err = p.communicate(timeout=RUN_TIMEOUT)
        if p.returncode != 0:
            raise SystemExit(f"{server.name} {load.name}: smtp-source failed: {err.decode().strip()}")
    accepted = time.monotonic() - t0
    if isinstance(server, Postfix):
        peak_rss = postfix_rss()
    if server.maildir:
        deadline = t0 + RUN_TIMEOUT
        while count_new(server.root(), mailboxes) < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.name} {load.name}: copies missing after {RUN_TIMEOUT} s")
            time.sleep(0.01)
    delivered = time.monotonic() - t0
    result = Result(server.name, load, accepted, delivered, cpu_s=cpu_busy() - cpu0)
    result.rss_peak = server.rss_peak() or peak_rss or None
    if server.maildir:
        verify(server, load, mailboxes, payload_digest)
    elif isinstance(server, Letterbox):
        verify_sink(server, load, payload_digest)
    return result


def body_of(raw):
    """The message body with LF line ends: what smtp-source sent after its
    header, whatever the server prepended."""
    raw = raw.replace(b"\r\n", b"\n")
    return raw.split(b"\n\n", 1)[1]


def verify(server, load, mailboxes, payload_digest):
    """Each mailbox holds exactly the copies sent to it, each complete."""
    for m, want in mailboxes.items():
        d = server.root() / DOMAIN / m / "new"
        files = list(os.scandir(d))
        if len(files) != want:
            raise SystemExit(f"{server.name} {load.name}: {d} has {len(files)} copies, not {want}")
        for f in files:
            data = open(f.path, "rb").read()
            if hashlib.sha256(body_of(data)).hexdigest() != payload_digest[load.size]:
                raise SystemExit(f"{server.name} {load.name}: {f.path} is not complete")
            if ",S=" in f.name and int(f.name.split(",S=")[1].split(",")[0].split(":")[0]) != len(data):
                raise SystemExit(f"{server.name} {load.name}: {f.path} size differs from its S=")


def verify_sink(server, load, payload_digest):
    """The newest copy in each sink mailbox is complete (older ones may have
    been evicted by the per-mailbox bound, as configured)."""
    boxes = {r for s in range(load.sessions) for r in recipients(s, load.rcpts, SINK_DOMAIN)}
    for r in sorted(boxes):
        url = f"{server.http}/api/v1/mailbox/{r}@{SINK_DOMAIN}"
        listing = json.load(urllib.request.urlopen(url))
        if not listing:
            raise SystemExit(f"sink {load.name}: {r}@{SINK_DOMAIN} is empty")
        raw = urllib.request.urlopen(f"{url}/{listing[0]['id']}/source").read()
        if hashlib.sha256(body_of(raw)).hexdigest() != payload_digest[load.size]:
            raise SystemExit(f"sink {load.name}: a copy for {r} is not complete")
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE")).read()


def reference_payloads(binary, work):
    """What smtp-source's body is for each size, as letterbox stores it:
    measured once, then every copy of every server is compared with it."""
    digests = {}
    ref = Letterbox(binary, work / "reference", f"sqlite://{work / 'reference' / 'db.sqlite'}",
                    "reference")
    ref.cli("migrate")
    ref.cli("domain", "add", DOMAIN)
    ref.cli("user", "add", f"0@{DOMAIN}")
    ref.start()
    try:
        for size in (4096, 256 * 1024):
            ref.clear()
            run(["smtp-source", "-l", str(size), "-m", "1", "-f", "sender@client.test",
                 "-t", f"0@{DOMAIN}", "-M", "client.test", f"127.0.0.1:{ref.port()}"])
            [f] = list(os.scandir(ref.root() / DOMAIN / "0" / "new"))
            body = body_of(open(f.path, "rb").read())
            # -l counts CRLFs; the stored body has LFs.
            if len(body) + body.count(b"\n") < size:
                raise SystemExit(f"smtp-source sent {len(body)} body bytes for -l {size}")
            digests[size] = hashlib.sha256(body).hexdigest()
    finally:
        ref.stop()
    return digests


# ---------------------------------------------------------------- idle


def idle_connections(server, n):
    """RSS of the server with n sessions open, each past its greeting."""
    base = server.rss()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", server.port()))
            socks.append(s)
        for s in socks:
            s.settimeout(30)
            if not s.recv(512).startswith(b"220 "):
                raise SystemExit("an idle connection got no greeting")
        time.sleep(1)
        return base, server.rss()
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- submission
#
# --submission: what issue #14 asks to be measured. Mail clients log in on a
# submission port (STARTTLS, then AUTH PLAIN) and send to a remote domain;
# the server queues each message durably, answers 250, and delivers it
# through its queue to that domain's next hop, a sink on 127.0.0.2 that
# bench/submit_load.rs runs in the same process as the clients. The clock
# runs from the first connect to the last message at the sink, so the
# queue's delivery is in it. Servers:
#   letterbox-submit         DKIM-signing for the From domain (what a real
#                            user has), RSA 2048 made by `letterbox dkim keygen`
#   letterbox-submit-nodkim  the same without a key
#   postfix-submit           a private Postfix instance (its own config,
#                            queue and data directories; the system one and
#                            its maildir peer are not touched), submission
#                            service with smtpd_tls_security_level=encrypt
#                            and Dovecot SASL (a private Dovecot with only
#                            its auth service, the same argon2 hashes as
#                            letterbox's users), signing with OpenDKIM as a
#                            milter with the same key
#   postfix-submit-nodkim    the same without the milter

SUB_REMOTE = "remote.bench.test"
SUB_PASSWORD = "bench submission password"
SUB_SELECTOR = "bench"
SUB_SERVERS = ("letterbox-submit", "postfix-submit", "letterbox-submit-nodkim",
               "postfix-submit-nodkim")


def submission_loads(quick):
    """Loads the submission client can send (one recipient); by default the
    headline one, 20 sessions of 4 KiB messages."""
    return [l for l in loads(quick) if l.rcpts == 1]


def self_signed(dir):
    """A throwaway certificate for both servers; the client pins it."""
    dir.mkdir(parents=True, exist_ok=True)
    cert, key = dir / "cert.pem", dir / "key.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "30", "-subj", "/CN=submission.bench.test",
         "-addext", "subjectAltName=DNS:submission.bench.test",
         "-keyout", key, "-out", cert], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(key, 0o600)
    return cert, key


def cpu_of(pids):
    """CPU seconds of processes and of their children they have reaped
    (utime, stime, cutime, cstime): a Postfix service process that exits
    during a run is counted in its master's."""
    total = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def count_files(*dirs):
    n = 0
    for d in dirs:
        for _, _, files in os.walk(d):
            n += len(files)
    return n


class SubmitLetterbox(Letterbox):
    """letterbox with its submission port open and a route for the remote
    domain to the sink; its own SQLite directory of users with passwords."""

    def __init__(self, binary, work, label, dkim, dns, tls):
        self.binary, self.work, self.name, self.dkim = binary, work, label, dkim
        self.dns, self.tls = dns, tls  # dns: (address, dnsmasq's pid)
        self.db_url = f"sqlite://{work / 'letterbox.db'}"
        self.proc = None
        self.config = work / "letterbox.toml"
        self.work.mkdir(parents=True, exist_ok=True)
        self.write_config("127.0.0.2:9")  # provisioning needs a config; start() rewrites it

    def write_config(self, sink):
        cert, key = self.tls
        # Logging at warn, as in the other runs; the DNS server answers the
        # null-MX check letterbox makes at each remote RCPT (bench/dns.sh:
        # nothing leaves the machine).
        self.config.write_text(f"""hostname = "mx.bench.test"
[database]
url = "{self.db_url}"
[smtp]
listen = ["127.0.0.1:0"]
reverse_dns = false
[tls]
cert = "{cert}"
key = "{key}"
[submission]
listen = ["127.0.0.1:0"]
[maildir]
root = "{self.work / 'mail'}"
[sink]
enabled = false
[dns]
servers = ["{self.dns[0]}"]
timeout = "2s"
[outbound]
routes = {{ "{SUB_REMOTE}" = "{sink}" }}
[log]
level = "warn"
{AUTH_OFF}""")

    def provision(self, users):
        """The domain, `users` users with the bench's password and, for the
        signing server, a DKIM key; returns the key's public half (base64)
        or None."""
        self.cli("migrate")
        self.cli("domain", "add", DOMAIN)
        for i in range(users):
            self.cli("user", "add", f"{i}@{DOMAIN}", "--password-stdin",
                     stdin=(SUB_PASSWORD + "\n").encode())
        if not self.dkim:
            return None
        self.cli("dkim", "keygen", DOMAIN, "--selector", SUB_SELECTOR)
        return self.dkim_key()[1]

    def sql(self, query):
        import sqlite3
        with sqlite3.connect(self.work / "letterbox.db") as db:
            return db.execute(query).fetchall()

    def passdb(self):
        """(user, {ARGON2ID} hash): what Dovecot checks on the Postfix side."""
        return self.sql("SELECT username, password FROM dovecot_passdb")

    def dkim_key(self):
        """(private PEM, public base64) of the signing key."""
        [(private, public)] = self.sql(
            f"SELECT private_key, public_key FROM dkim_keys WHERE selector = '{SUB_SELECTOR}'")
        return private, public

    def start(self, sink):
        self.write_config(sink)
        self.proc = subprocess.Popen(
            [self.binary, "--config", self.config, "serve"],
            stdout=subprocess.PIPE, stderr=open(self.work / "serve.log", "ab"), text=True)
        self.submission = None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("letterbox: submission listening on "):
                self.submission = int(line.rsplit(":", 1)[1])
            elif line == "letterbox: ready":
                break
        if self.submission is None:
            raise SystemExit(f"letterbox did not start; see {self.work / 'serve.log'}")

    def port(self):
        return self.submission

    def queued(self):
        q = self.work / "mail" / ".letterbox-queue"
        return sum(1 for f in os.scandir(q) if f.name.endswith(".state")) + count_files(q / "tmp")

    def rss_now(self):
        return None  # VmHWM at the end says more

    def cpu(self):
        return cpu_of([self.proc.pid, self.dns[1]])


class SubmitPostfix(Server):
    """A private Postfix instance (postfix -c DIR) with a submission
    service, Dovecot SASL and, when `dkim`, OpenDKIM as a milter. Stock
    queue and delivery settings: a durable queue file per message, the
    default destination concurrency (20) and connection cache."""

    maildir = False

    def __init__(self, work, label, dkim, tls, passdb, dkim_private):
        self.work, self.name, self.dkim, self.tls = work, label, dkim, tls
        self.etc, self.queue = work / "etc", work / "queue"
        self.dovecot_conf = work / "dovecot" / "dovecot.conf"
        self.opendkim = None
        self.submission = None
        self.setup(passdb, dkim_private)

    def setup(self, passdb, dkim_private):
        w = self.work
        for d in (self.etc, self.queue, w / "data", w / "dovecot" / "state", w / "opendkim"):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(w / "data", "postfix")
        os.chmod(w / "data", 0o700)
        # Debian's master.cf with chroot off (the private directories are
        # not set up as chroots) and the port-25 service replaced by
        # submission on loopback; the port is set at each start.
        master = []
        for line in open("/usr/share/postfix/master.cf.dist"):
            f = line.split()
            if line[:1].isalpha() and len(f) >= 8 and f[4] == "y":
                f[4] = "n"
                line = " ".join(f) + "\n"
            if line.startswith("smtp ") or line.startswith("smtp\t"):
                if f[1] == "inet":
                    line = ("127.0.0.1:PORT inet n - n - - smtpd\n"
                            "  -o syslog_name=postfix/submission\n"
                            "  -o smtpd_tls_security_level=encrypt\n"
                            "  -o smtpd_tls_auth_only=yes\n"
                            "  -o smtpd_sasl_auth_enable=yes\n"
                            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
                            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n")
            master.append(line)
        (self.etc / "master.cf").write_text("".join(master))
        cert, key = self.tls
        (self.etc / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {w / 'data'}
myhostname = submit.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = {w / 'postfix.log'}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtp_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = {w / 'dovecot' / 'run' / 'auth-postfix'}
milter_default_action = tempfail
""")
        (w / "dovecot" / "passwd").write_text("".join(f"{u}:{h}\n" for u, h in passdb))
        self.dovecot_conf.write_text(f"""base_dir = {w / 'dovecot' / 'run'}
state_dir = {w / 'dovecot' / 'state'}
instance_name = letterbox-bench-auth
protocols =
log_path = {w / 'dovecot' / 'dovecot.log'}
auth_mechanisms = plain
disable_plaintext_auth = no
ssl = no
passdb {{
  driver = passwd-file
  args = {w / 'dovecot' / 'passwd'}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
""")
        if self.dkim:
            keyfile = w / "opendkim" / "key.pem"
            keyfile.write_text(dkim_private)
            os.chmod(keyfile, 0o600)
            # Signing only, as letterbox does: relaxed/relaxed, From,
            # Subject and Reply-To oversigned.
            (w / "opendkim" / "opendkim.conf").write_text(f"""Mode s
Domain {DOMAIN}
Selector {SUB_SELECTOR}
KeyFile {keyfile}
Canonicalization relaxed/relaxed
OversignHeaders From,Subject,Reply-To
Syslog no
RequireSafeKeys false
""")

    def postconf(self, *settings):
        run(["postconf", "-c", self.etc, "-e", *settings], stdout=subprocess.DEVNULL)

    def start(self, sink):
        self.submission = free_port()
        master = self.etc / "master.cf"
        lines = master.read_text().splitlines(keepends=True)
        lines = [f"127.0.0.1:{self.submission} inet n - n - - smtpd\n"
                 if l.startswith("127.0.0.1:") else l for l in lines]
        master.write_text("".join(lines))
        milters = ""
        if self.dkim:
            port = free_port()
            self.opendkim = subprocess.Popen(
                ["opendkim", "-f", "-x", self.work / "opendkim" / "opendkim.conf",
                 "-p", f"inet:{port}@127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=open(self.work / "opendkim" / "log", "ab"))
            wait_port(port)
            milters = f"inet:127.0.0.1:{port}"
        host, port = sink.rsplit(":", 1)
        self.postconf(f"transport_maps=inline:{{{SUB_REMOTE}=smtp:[{host}]:{port}}}",
                      f"smtpd_milters={milters}")
        run(["dovecot", "-c", self.dovecot_conf])
        run(["postfix", "-c", self.etc, "start"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_port(self.submission)

    def stop(self):
        # Both return before their masters are gone; the next start of the
        # same instance would find them still there.
        masters = [self.queue / "pid" / "master.pid", self.work / "dovecot" / "run" / "master.pid"]
        pids = []
        for f in masters:
            try:
                pids.append(int(f.read_text()))
            except (OSError, ValueError):
                pass
        run(["postfix", "-c", self.etc, "stop"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        run(["dovecot", "-c", self.dovecot_conf, "stop"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.opendkim:
            self.opendkim.terminate()
            self.opendkim.wait(10)
            self.opendkim = None

    def port(self):
        return self.submission

    def queued(self):
        return count_files(*(self.queue / d for d in
                             ("maildrop", "incoming", "active", "deferred", "hold")))

    def pids(self):
        """This instance's processes (MAIL_CONFIG names its directory), its
        Dovecot's and its OpenDKIM."""
        dovecot = (self.work / "dovecot" / "run" / "master.pid")
        try:
            dovecot = dovecot.read_text().strip()
        except OSError:
            dovecot = None
        mine = f"MAIL_CONFIG={self.etc}".encode()
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            ppid = stat.rsplit(")", 1)[1].split()[1]
            if (mine in env or pid == dovecot or ppid == dovecot
                    or (self.opendkim and int(pid) == self.opendkim.pid)):
                out.append(pid)
        return out

    def rss_now(self):
        return sum(vm(pid, "VmRSS") or 0 for pid in self.pids())

    def cpu(self):
        return cpu_of(self.pids())

    def rss_peak(self):
        return None


class RssSampler:
    """The highest RSS a server reached, sampled every second in a thread:
    Postfix's memory is spread over processes that come and go. (A scan of
    /proc for Postfix's processes costs a few ms of CPU.)"""

    def __init__(self, server):
        import threading
        self.server, self.peak = server, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.done.wait(1):
            self.peak = max(self.peak, self.server.rss_now() or 0)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak


def verify_dkim(sample, public, who):
    """The first message the sink got carries a signature that verifies
    with the bench key (dkimpy, as the tests use)."""
    try:
        import dkim
    except ImportError:
        print("dkimpy missing (python3-dkim): the signatures are counted, not verified",
              file=sys.stderr)
        return
    record = f"v=DKIM1; k=rsa; p={public}".encode()
    if not dkim.verify(sample.read_bytes(), dnsfunc=lambda name, timeout=5: record):
        raise SystemExit(f"{who}: the DKIM signature of {sample} does not verify")


def submission_run(server, load, client, tls, work, dkim_public):
    """One load through one server; fails loudly unless every message
    reached the sink exactly once, intact, signed when it should be, and
    the server's queue is empty afterwards."""
    sample = work / "sample.eml"
    sample.unlink(missing_ok=True)
    err = open(work / "submit_load.err", "w+")
    proc = subprocess.Popen(
        [client, "--cert", tls[0], "--password", SUB_PASSWORD, "--sessions", str(load.sessions),
         "--messages", str(load.messages), "--size", str(load.size), "--sink", "127.0.0.2:0",
         "--sample", sample, "--timeout", str(RUN_TIMEOUT)] + (["--dkim"] if server.dkim else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def fail(why):
        err.seek(0)
        raise SystemExit(f"{server.name} {load.name}: {why} {err.read().strip()}")

    try:
        first = proc.stdout.readline().split()
        if first[:1] != ["sink"]:
            fail("submit_load did not start:")
        server.start(first[1])
        try:
            os.sync()
            sampler = RssSampler(server)
            cpu0, server0, client0 = cpu_busy(), server.cpu(), cpu_of([proc.pid])
            proc.stdin.write(f"go 127.0.0.1:{server.port()}\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            cpu = cpu_busy() - cpu0
            server_cpu, client_cpu = server.cpu() - server0, cpu_of([proc.pid]) - client0
            peak = sampler.stop()
            if not line:
                fail("submit_load failed:")
            timing = json.loads(line)
            server.tls_seen = timing.get("tls")
            deadline = time.monotonic() + 60
            while (left := server.queued()) > 0:
                if time.monotonic() > deadline:
                    fail(f"{left} queue files left a minute after the last delivery")
                time.sleep(0.05)
            proc.stdin.close()
            final = json.loads(proc.stdout.readline() or "{}")
            if proc.wait(30) != 0:
                fail(f"the sink counted {final}:")
            if server.dkim:
                verify_dkim(sample, dkim_public, server.name)
            peak = max(peak, server.rss_peak() or 0)
        finally:
            server.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Result(server.name, load, timing["accepted_s"], timing["delivered_s"], peak or None,
                  cpu, sink_connections=final["connections"], server_cpu_s=server_cpu,
                  client_cpu_s=client_cpu)


def submission_main(args):
    """--submission: letterbox and Postfix as submission servers relaying
    through their queues, interleaved per repetition like the main run."""
    client = args.submit_load or args.binary.parent / "examples" / "submit_load"
    if not client.exists():
        raise SystemExit(f"no {client}: cargo build --release --example submit_load")
    todo = submission_loads(args.quick)
    todo = [l for l in todo if l.name in (args.loads or "20s-4K-1r").split(",")]
    if not todo:
        raise SystemExit("--submission sends to one recipient: a load ending in -1r")
    work = args.work
    tls = self_signed(work / "tls")
    # letterbox asks for the remote domain's MX at each RCPT (a null MX
    # refuses mail): answered, with a TTL, as a real domain's would be, so
    # that its resolver caches it as it would in production. Nothing is
    # asked of the system's resolver.
    dns_dir = work / "dns"
    dns = subprocess.run(["bash", str(Path(__file__).with_name("dns.sh")), dns_dir,
                          str(free_port()), f"mx-host={SUB_REMOTE},mx.{SUB_REMOTE},10",
                          "local-ttl=300"], check=True, capture_output=True,
                         text=True).stdout.split()[-1]
    dns = (dns, int((dns_dir / "dnsmasq.pid").read_text()))
    try:
        users = max(l.sessions for l in todo)
        lb = SubmitLetterbox(args.binary, work / "letterbox-submit", "letterbox-submit", True,
                             dns, tls)
        lb_plain = SubmitLetterbox(args.binary, work / "letterbox-submit-nodkim",
                                   "letterbox-submit-nodkim", False, dns, tls)
        public = lb.provision(users)
        lb_plain.provision(users)
        private, _ = lb.dkim_key()
        servers = [
            lb,
            SubmitPostfix(work / "postfix-submit", "postfix-submit", True, tls, lb.passdb(),
                          private),
            lb_plain,
            SubmitPostfix(work / "postfix-submit-nodkim", "postfix-submit-nodkim", False, tls,
                          lb.passdb(), None),
        ]
        if args.only:
            servers = [s for s in servers if s.name in args.only.split(",")]
        results = []
        for load in todo:
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else list(reversed(servers))
                for server in order:
                    r = submission_run(server, load, client, tls, work, public)
                    results.append(r)
                    print(f"{load.name:>14} rep {rep + 1} {server.name:>24}: "
                          f"{r.msgs_per_s:8.0f} msg/s  ({r.delivered_s:.2f} s, 250s at "
                          f"{r.accepted_s:.2f} s, {r.sink_connections} connections, "
                          f"{server.tls_seen})", flush=True)
    finally:
        try:
            os.kill(int((dns_dir / "dnsmasq.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    path = args.out / "results.json"
    raw = json.loads(path.read_text()) if path.exists() else {}
    raw["submission"] = {
        "reps": args.reps,
        "versions": versions(args.binary, submission=True),
        "results": [dict(vars(r), load=vars(r.load)) for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1) + "\n")
    report_only(args.out)
    GRAVEYARD.empty()


# ---------------------------------------------------------------- report


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def mib(b):
    return f"{b / 1048576:.1f} MiB" if b else "–"


def report(results, args, idle, versions, out_dir, submission=None):
    """RESULTS.md: the matrix's tables, the submission run's, then
    analysis.md; and the chart."""
    lines = []
    w = lines.append
    w("# Benchmark results\n")
    by, servers = matrix_report(w, results, args, idle, versions) if results else ({}, [])
    if submission:
        submission_report(w, submission)
    notes = Path(__file__).with_name("analysis.md")
    if notes.exists():
        w(notes.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    if by:
        chart(by, servers, out_dir)
    print("\n".join(lines))


def matrix_report(w, results, args, idle, versions):
    """The tables of the main run (smtp-source, every server and load)."""
    by = {}
    for r in results:
        by.setdefault((r.load, r.server), []).append(r)
    servers = [s for s in ("letterbox", "letterbox-base", "letterbox-milter", "letterbox-auth",
                           "letterbox-pg",
                           "postfix", "disk", "letterbox-sink", "smtp-sink")
               if any(k[1] == s for k in by)]
    with_base = "letterbox-base" in servers
    with_milter = "letterbox-milter" in servers
    with_auth = "letterbox-auth" in servers
    the_loads = sorted({k[0] for k in by}, key=lambda l: (l.size, l.rcpts, l.sessions))

    def rate(load, server):
        rs = by.get((load, server))
        return median([r.msgs_per_s for r in rs]) if rs else None

    w("Written by `bench/run.sh`; do not edit by hand. Medians of "
      f"{args.reps} interleaved repetitions per load.\n")
    w("## Machine and versions\n")
    for k, v in versions.items():
        w(f"- {k}: {v}")
    w("")
    w("## Command lines\n")
    w("- load, one per session: `smtp-source -l SIZE -m PER_SESSION -r RCPTS -f sender@client.test "
      "-t <session>@bench.test -M client.test 127.0.0.1:PORT` (sessions run in parallel; "
      "sink loads use `<session>@s.sink.bench.test`)")
    w("- letterbox: `target/release/letterbox --config WORK/letterbox.toml serve` "
      "(config in `bench/run.sh`'s work dir; SQLite or PostgreSQL directory, cache_ttl 5s)")
    w("- postfix: `bench/postfix-peer.sh 1000` (virtual(8) into maildirs, SQLite maps)")
    w("- smtp-sink: `smtp-sink -u nobody 127.0.0.1:PORT 1024`")
    w("- disk: `fsync_ceiling --root WORK/disk --writers SESSIONS --copies MESSAGES --size SIZE`")
    w("")
    w("## Throughput (messages/s, until the last copy is in new/)\n")
    w("| load | " + " | ".join(servers)
      + (" | letterbox ÷ base" if with_base else "")
      + (" | milter ÷ letterbox" if with_milter else "")
      + (" | auth ÷ letterbox" if with_auth else "")
      + " | letterbox ÷ postfix | letterbox ÷ disk | letterbox-pg ÷ letterbox | sink ÷ smtp-sink |")
    w("|---|" + "---|" * (len(servers) + 4 + with_base + with_milter + with_auth))
    for load in the_loads:
        row = [f"{rate(load, s):.0f}" if rate(load, s) else "–" for s in servers]
        lb, pf, dk = rate(load, "letterbox"), rate(load, "postfix"), rate(load, "disk")
        pg, sk, ss = rate(load, "letterbox-pg"), rate(load, "letterbox-sink"), rate(load, "smtp-sink")
        ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "–"
        base = f" | {ratio(lb, rate(load, 'letterbox-base'))}" if with_base else ""
        base += f" | {ratio(rate(load, 'letterbox-milter'), lb)}" if with_milter else ""
        base += f" | {ratio(rate(load, 'letterbox-auth'), lb)}" if with_auth else ""
        w(f"| {load.name} ({load.messages} msgs) | " + " | ".join(row) + base
          + f" | {ratio(lb, pf)} | {ratio(lb, dk)} | {ratio(pg, lb)} | {ratio(sk, ss)} |")
    w("")
    w("Load names: sessions-size-recipients. Each message to R recipients is R copies on disk. "
      "`disk` is no server: bench/fsync_ceiling.rs doing each copy's filesystem work (create in "
      "tmp/, write, fdatasync, link into new/, unlink, fsync new/) from one thread per session, "
      "the ceiling the disk set for durable delivery in that run (1-recipient loads only).\n")
    def table(title, cell):
        """One row per load, one column per server; `cell` formats a
        server's results on a load."""
        w(f"## {title}\n")
        w("| load | " + " | ".join(servers) + " |")
        w("|---|" + "---|" * len(servers))
        for load in the_loads:
            cells = [cell(load, by[(load, s)]) if (load, s) in by else "–" for s in servers]
            w(f"| {load.name} | " + " | ".join(cells) + " |")
        w("")

    table("Latency (mean time per message within one session, connect to 250)",
          lambda l, rs: f"{median([r.accepted_s * l.sessions / l.messages for r in rs]) * 1000:.2f} ms")
    w("Postfix answers 250 when its queue file is safe and delivers later; its time to new/ "
      "is in the throughput table.\n")
    table("CPU (ms of busy CPU per message, whole machine, smtp-source included)",
          lambda l, rs: f"{median([r.cpu_s / l.messages for r in rs]) * 1000:.3f}")
    table("Memory", lambda l, rs: mib(max((r.rss_peak or 0) for r in rs)))
    w("Peak RSS (VmHWM) of the letterbox and smtp-sink processes over the run; for Postfix the "
      "sum of its processes' RSS right after the last 250.\n")
    if idle:
        base, held = idle
        w(f"Idle connections: letterbox with {args.idle} sessions open past the greeting: "
          f"{mib(held)} RSS ({mib(base)} before they connected).\n")
    return by, servers


def submission_report(w, sub):
    """The tables of the --submission run, from its part of results.json."""
    results = [Result(**dict(r, load=Load(**r["load"]))) for r in sub["results"]]
    by = {}
    for r in results:
        by.setdefault((r.load, r.server), []).append(r)
    servers = [s for s in SUB_SERVERS if any(k[1] == s for k in by)]
    the_loads = sorted({k[0] for k in by}, key=lambda l: (l.size, l.sessions))
    v = sub["versions"]

    def rate(load, server):
        rs = by.get((load, server))
        return median([r.msgs_per_s for r in rs]) if rs else None

    w("## Submission relayed through the queue (issue #14)\n")
    w(f"`bench/harness.py --submission`, {v.get('date', '?')}, {v.get('machine', '?')}; "
      f"{v.get('letterbox', '?')}, Postfix {v.get('postfix', '?')}, Dovecot "
      f"{v.get('dovecot', '?')}, {v.get('opendkim', '?')}. Medians of {sub['reps']} "
      "repetitions, the servers interleaved (A B C D, D C B A, …).\n")
    w("- load: `submit_load --sessions S --messages M --size SIZE --sink 127.0.0.2:0` "
      "(bench/submit_load.rs). Each session: EHLO, STARTTLS (TLS 1.3 with both servers, as "
      "submit_load reports; the self-signed "
      "certificate pinned), EHLO, AUTH PLAIN as `<session>@bench.test`, then its M/S messages "
      "one transaction after another on the same connection (MAIL, RCPT, DATA; no RSET, no "
      "pipelining), from `<session>@bench.test` to `<session>@remote.bench.test`, QUIT.")
    w("- destination: the same process listens on 127.0.0.2 (PIPELINING, no STARTTLS, any "
      "number of messages per connection) and checks every message: the body byte for byte, "
      "a Message-ID not seen before, a DKIM-Signature exactly when the server signs (the first "
      "one verified with dkimpy). A run fails unless every message arrived once and the "
      "server's queue is empty afterwards.")
    w("- letterbox-submit: `[submission] listen`, `[outbound] routes = { \"remote.bench.test\" = "
      "\"127.0.0.2:PORT\" }`, other settings default (4 connections per destination, one "
      "message per connection), a DKIM key from `letterbox dkim keygen` (RSA 2048); "
      "letterbox-submit-nodkim: no key. Both ask for the remote domain's MX at each RCPT (the "
      "null-MX check), of bench/dns.sh's dnsmasq, which answers with an MX record and a "
      "300 s TTL.")
    w("- postfix-submit: a private instance (`postfix -c WORK/postfix-submit/etc`), Debian's "
      "master.cf with a submission service (`smtpd_tls_security_level=encrypt`, "
      "`smtpd_tls_auth_only=yes`, Dovecot SASL from a private Dovecot with the users' argon2 "
      "hashes copied from letterbox), `transport_maps = inline:{remote.bench.test="
      "smtp:[127.0.0.2]:PORT}`, other settings default (destination concurrency 20, connection "
      "cache), OpenDKIM as a milter with the same key; postfix-submit-nodkim: no milter.")
    w("")
    w("| load | server | messages/s to the destination | messages/s accepted "
      "| CPU ms per message: server | load tool | whole machine "
      "| memory | connections to the destination | each repetition (messages/s) |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for load in the_loads:
        for s in servers:
            rs = by.get((load, s))
            if not rs:
                continue
            conns = median([r.sink_connections for r in rs if r.sink_connections is not None])
            ms = lambda f: median([f(r) / load.messages for r in rs]) * 1000
            w(f"| {load.name} ({load.messages} msgs) | {s} | {rate(load, s):.0f} "
              f"| {median([load.messages / r.accepted_s for r in rs]):.0f} "
              f"| {ms(lambda r: r.server_cpu_s):.2f} | {ms(lambda r: r.client_cpu_s):.2f} "
              f"| {ms(lambda r: r.cpu_s):.2f} "
              f"| {mib(max((r.rss_peak or 0) for r in rs))} | {conns:.0f} "
              f"| {', '.join(f'{r.msgs_per_s:.0f}' for r in rs)} |")
    w("")
    w("| load | letterbox ÷ postfix, both signing | letterbox ÷ postfix, neither signing "
      "| letterbox signing ÷ not | postfix signing ÷ not |")
    w("|---|---|---|---|---|")
    ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "–"
    for load in the_loads:
        r = {s: rate(load, s) for s in SUB_SERVERS}
        w(f"| {load.name} | {ratio(r['letterbox-submit'], r['postfix-submit'])} "
          f"| {ratio(r['letterbox-submit-nodkim'], r['postfix-submit-nodkim'])} "
          f"| {ratio(r['letterbox-submit'], r['letterbox-submit-nodkim'])} "
          f"| {ratio(r['postfix-submit'], r['postfix-submit-nodkim'])} |")
    w("")
    w("Messages/s to the destination: messages ÷ time from the first connect to the last "
      "message at the sink, so the queue's delivery is in it; accepted: ÷ time to the last "
      "session's 221. CPU, until the last message is at the destination: of the server's "
      "processes (letterbox and the DNS server it asks; Postfix's, its Dovecot's and its "
      "OpenDKIM's, with the children they reaped), of submit_load (the clients and the sink), "
      "and the busy time of the whole machine (which counts the kernel's own threads, and "
      "anything else running). Memory: letterbox's peak RSS (VmHWM); for Postfix the highest sum of its "
      "processes' RSS, its Dovecot's and its OpenDKIM's, sampled every second.\n")


def chart(by, servers, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, size in zip(axes, (4096, 256 * 1024)):
        for s in ("letterbox", "letterbox-pg", "postfix", "smtp-sink", "letterbox-sink", "disk"):
            pts = sorted((l.sessions, median([r.msgs_per_s for r in rs]))
                         for (l, srv), rs in by.items() if srv == s and l.size == size and l.rcpts == 1)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s,
                        linestyle="--" if s == "disk" else "-")
        ax.set_xscale("log")
        ax.set_xticks([1, 20, 100], ["1", "20", "100"])
        ax.set_xlabel("parallel sessions")
        ax.set_ylabel("messages/s")
        ax.set_title(f"{size // 1024} KiB, 1 recipient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--postfix-base", type=Path, default=Path("/var/mail/postfix-peer"))
    ap.add_argument("--ceiling", type=Path, help="the fsync_ceiling binary; disk runs when set")
    ap.add_argument("--postgres", help="admin URL; letterbox-pg runs when set")
    ap.add_argument("--milter", help="a milter address (bench/rspamd.sh prints one); "
                                      "letterbox-milter runs with it as its only milter")
    ap.add_argument("--auth-dns", help="a DNS server (bench/dns.sh prints one); letterbox-auth runs "
                                        "with SPF, DKIM, DMARC and ARC on and one DNSBL against it")
    ap.add_argument("--baseline", type=Path,
                    help="an earlier letterbox binary, run as letterbox-base beside the current one "
                         "(same directory, same loads, interleaved): a before/after in one sitting")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="a quarter of the messages")
    ap.add_argument("--only", help="comma-separated server names")
    ap.add_argument("--loads", help="comma-separated load names, e.g. 20s-4K-1r")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS.md from OUT/results.json")
    ap.add_argument("--submission", action="store_true",
                    help="instead of the matrix: submission on a STARTTLS port with AUTH, relayed "
                         "through the queue to a remote domain's sink, letterbox against a private "
                         "Postfix (see submission_main); its results replace only the submission "
                         "part of results.json")
    ap.add_argument("--submit-load", type=Path,
                    help="the submit_load example binary (default: beside --binary, in examples/)")
    args = ap.parse_args()
    if args.report_only:
        return report_only(args.out)

    global GRAVEYARD
    GRAVEYARD = Graveyard(args.work.with_name(args.work.name + "-graveyard"))
    GRAVEYARD.wait_for_last()
    if args.work.exists():
        GRAVEYARD.bury(args.work)
    args.work.mkdir(parents=True)
    if args.submission:
        return submission_main(args)
    digests = reference_payloads(args.binary, args.work)

    servers = [Letterbox(args.binary, args.work / "sqlite",
                         f"sqlite://{args.work / 'sqlite' / 'letterbox.db'}", "letterbox")]
    if args.baseline:
        # Its own directory: an earlier binary refuses a database migrated
        # past what it knows.
        servers.append(Letterbox(args.baseline, args.work / "base",
                                 f"sqlite://{args.work / 'base' / 'letterbox.db'}", "letterbox-base",
                                 auth=""))
    if args.milter:
        servers.append(Letterbox(args.binary, args.work / "milter",
                                 f"sqlite://{args.work / 'sqlite' / 'letterbox.db'}", "letterbox-milter",
                                 extra=f'[[milters]]\naddress = "{args.milter}"\ndefault_action = "tempfail"\n'))
    if args.auth_dns:
        servers.append(Letterbox(
            args.binary, args.work / "auth", f"sqlite://{args.work / 'sqlite' / 'letterbox.db'}",
            "letterbox-auth",
            auth=(f'[dns]\nservers = ["{args.auth_dns}"]\ntimeout = "2s"\n'
                  '[auth]\nspf = "tag"\ndkim = "tag"\ndmarc = "enforce"\narc = "tag"\n'
                  '[[dnsbl]]\nzone = "bl.bench.test"\n')))
    if args.ceiling:
        servers.append(Disk(args.ceiling, args.work / "disk"))
    if args.postgres:
        servers.append(Letterbox(args.binary, args.work / "pg", pg_database(args.postgres),
                                 "letterbox-pg"))
    servers.append(Postfix(args.postfix_base))
    # The sink needs no users: it shares the SQLite directory (with its rule).
    servers.append(Letterbox(args.binary, args.work / "sink",
                             f"sqlite://{args.work / 'sqlite' / 'letterbox.db'}", "letterbox-sink",
                             sink=True))
    servers.append(SmtpSink())
    sqlite = servers[0]
    if args.only:
        keep = args.only.split(",")
        servers = [s for s in servers if s.name in keep]
    todo = loads(args.quick)
    if args.loads:
        todo = [l for l in todo if l.name in args.loads.split(",")]
    GRAVEYARD.check_room(todo, args.reps, sum(1 for s in servers if s.maildir))
    sqlite.provision()  # the sink's directory too
    for s in servers:
        if s.name in ("letterbox-pg", "letterbox-base"):
            s.provision()

    results = []
    for load in todo:
        for rep in range(args.reps):
            # Alternate the order too, so no server always runs on a warm cache.
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for server in order:
                if isinstance(server, Disk) and load.rcpts != 1:
                    continue
                server.start()
                try:
                    r = one_run(server, load, digests)
                finally:
                    server.stop()
                results.append(r)
                print(f"{load.name:>14} rep {rep + 1} {server.name:>14}: "
                      f"{r.msgs_per_s:8.0f} msg/s  ({r.delivered_s:.2f} s, 250s at {r.accepted_s:.2f} s)",
                      flush=True)
    idle = None
    lb = next((s for s in servers if s.name == "letterbox"), None)
    if lb and args.idle:
        lb.start()
        try:
            idle = idle_connections(lb, args.idle)
        finally:
            lb.stop()
    raw = {
        "reps": args.reps,
        "idle": [args.idle, idle],
        "versions": versions(args.binary),
        "results": [dict(vars(r), load=vars(r.load)) for r in results],
    }
    # The submission run's part is kept: each mode replaces only its own.
    path = args.out / "results.json"
    if path.exists() and "submission" in (old := json.loads(path.read_text())):
        raw["submission"] = old["submission"]
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1) + "\n")
    report_only(args.out)
    GRAVEYARD.empty()


def report_only(out):
    """Rewrites RESULTS.md and the chart from results.json (after editing
    analysis.md, say) without running anything."""
    raw = json.loads((out / "results.json").read_text())
    results = [Result(**dict(r, load=Load(**r["load"]))) for r in raw.get("results", [])]
    args = argparse.Namespace(reps=raw.get("reps"), idle=raw.get("idle", [0])[0])
    idle = tuple(raw["idle"][1]) if raw.get("idle", [0, None])[1] else None
    report(results, args, idle, raw.get("versions", {}), out, raw.get("submission"))


def pg_database(admin_url):
    """A fresh database for letterbox-pg on the server of `admin_url`."""
    base = admin_url.rsplit("/", 1)[0]
    run(["psql", admin_url, "-q", "-c", "DROP DATABASE IF EXISTS letterbox_bench WITH (FORCE)"])
    run(["psql", admin_url, "-q", "-c", "CREATE DATABASE letterbox_bench"])
    return f"{base}/letterbox_bench"


def versions(binary, submission=False):
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    disk = out(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "-T", str(binary)])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, kernel {platform.release()}",
        "filesystem": disk,
        "letterbox": out([str(binary), "--version"]) + " (release build)",
        "postfix": out(["postconf", "-d", "-h", "mail_version"]),
        "rustc": out(["rustc", "--version"]),
    } | ({
        "dovecot": out(["dovecot", "--version"]),
        "opendkim": out(["opendkim", "-V"]),
        "openssl": out(["openssl", "version"]),
    } if submission else {})


if __name__ == "__main__":
    main()
