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


# ---------------------------------------------------------------- report


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def mib(b):
    return f"{b / 1048576:.1f} MiB" if b else "–"


def report(results, args, idle, versions, out_dir):
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

    lines = []
    w = lines.append
    w("# Benchmark results\n")
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
    notes = Path(__file__).with_name("analysis.md")
    if notes.exists():
        w(notes.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    chart(by, servers, out_dir)
    print("\n".join(lines))


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
    args = ap.parse_args()
    if args.report_only:
        return report_only(args.out)

    global GRAVEYARD
    GRAVEYARD = Graveyard(args.work.with_name(args.work.name + "-graveyard"))
    GRAVEYARD.wait_for_last()
    if args.work.exists():
        GRAVEYARD.bury(args.work)
    args.work.mkdir(parents=True)
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    report(results, args, idle, raw["versions"], args.out)
    GRAVEYARD.empty()


def report_only(out):
    """Rewrites RESULTS.md and the chart from results.json (after editing
    analysis.md, say) without running anything."""
    raw = json.loads((out / "results.json").read_text())
    results = [Result(**dict(r, load=Load(**r["load"]))) for r in raw["results"]]
    args = argparse.Namespace(reps=raw["reps"], idle=raw["idle"][0])
    idle = tuple(raw["idle"][1]) if raw["idle"][1] else None
    report(results, args, idle, raw["versions"], out)


def pg_database(admin_url):
    """A fresh database for letterbox-pg on the server of `admin_url`."""
    base = admin_url.rsplit("/", 1)[0]
    run(["psql", admin_url, "-q", "-c", "DROP DATABASE IF EXISTS letterbox_bench WITH (FORCE)"])
    run(["psql", admin_url, "-q", "-c", "CREATE DATABASE letterbox_bench"])
    return f"{base}/letterbox_bench"


def versions(binary):
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
        "postfix": out(["postconf", "-h", "mail_version"]),
        "rustc": out(["rustc", "--version"]),
    }


if __name__ == "__main__":
    main()
