//! Private instances of the Debian programs letterbox talks to: rspamd as
//! a milter (proxy worker scanning by itself), OpenDKIM signing, and
//! postgrey as a policy server. Each runs from config files in its own
//! temporary directory, on a free loopback port or a socket in that
//! directory, never the system-wide service, and is stopped when dropped.
//!
//! A program that is not installed skips its test with a note on stderr,
//! except when `CI` is set: then the test fails, so CI never passes by
//! skipping. `.ci/run` installs: rspamd opendkim opendkim-tools postgrey
//! python3-dkim.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to listen. rspamd needs the longest: it
/// loads its Lua rules and compiles its regular expressions at start.
const STARTUP: Duration = Duration::from_secs(60);

/// The program's path, or `None` (after saying why) when it is not
/// installed and the test should skip. Panics under CI.
pub fn program(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is not installed; CI must install it (see tests/common/daemons.rs)");
    }
    eprintln!("SKIP: {name} is not installed");
    None
}

/// `python3` with the `dkim` module (Debian's python3-dkim), or `None`
/// when missing and not under CI.
pub fn dkimpy() -> Option<PathBuf> {
    let python = program("python3")?;
    let ok = Command::new(&python)
        .args(["-c", "import dkim"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    if std::env::var_os("CI").is_some() {
        panic!("python3-dkim is not installed; CI must install it");
    }
    eprintln!("SKIP: python3-dkim is not installed");
    None
}

/// A loopback port nothing listens on right now. The daemon binds it a
/// moment later; [`Daemon::wait_tcp`] notices if someone else did.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running daemon in its own process group (so its workers go with
/// it), its output in a log file. Stopped when dropped.
pub struct Daemon {
    /// For messages.
    name: &'static str,
    /// The process, leader of its own group.
    child: Child,
    /// stdout and stderr, plus whatever log file the config names.
    logs: Vec<PathBuf>,
}

impl Daemon {
    /// Starts `command` with stdout and stderr to `<dir>/<name>.out`.
    pub fn spawn(name: &'static str, command: &mut Command, dir: &Path) -> Daemon {
        let out_path = dir.join(format!("{name}.out"));
        let out = fs::File::create(&out_path).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name,
            child,
            logs: vec![out_path],
        }
    }

    /// Adds a log file the daemon writes itself, for failure messages.
    pub fn also_log(mut self, path: PathBuf) -> Daemon {
        self.logs.push(path);
        self
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for p in &self.logs {
            let mut s = String::new();
            if let Ok(mut f) = fs::File::open(p) {
                let _ = f.read_to_string(&mut s);
            }
            all.push_str(&format!("--- {}\n{s}", p.display()));
        }
        all
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Waits until something accepts connections on `addr`.
    pub fn wait_tcp(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.check_alive();
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {addr}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until something accepts connections on the socket `path`.
    pub fn wait_unix(&mut self, path: &Path) {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.check_alive();
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {}:\n{}",
                self.name,
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) on the process group we created for our child;
        // no memory is touched.
        unsafe { libc::kill(group, libc::SIGTERM) };
        // Half a second to go cleanly; OpenDKIM (libmilter) takes five
        // to notice, and nothing of a test daemon needs saving.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Workers that outlived their parent, or a parent still going.
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

// ---- rspamd ----

/// A private rspamd whose proxy worker speaks the milter protocol on
/// `addr` and scans messages itself (`self_scan`), so no normal worker,
/// Redis or network is needed.
pub struct Rspamd {
    /// The milter's TCP address.
    pub addr: SocketAddr,
    /// The process; declared before `dir` so it stops before its files go.
    pub daemon: Daemon,
    /// Config, database, log.
    pub dir: tempfile::TempDir,
}

/// Starts rspamd with the config below, after `rspamadm configtest`
/// accepted it; `None` when rspamd is not installed (and not under CI).
///
/// The config reuses Debian's rules (`$CONFDIR/common.conf`) and replaces
/// the parts that would touch the system or the network:
/// - every path (database, pid file, control socket, log) is in the temp dir;
/// - DNS goes to a closed loopback port, so lookups fail at once and no
///   query leaves the machine; the fuzzy-hash check (which names remote
///   servers) is off;
/// - the public-suffix list is a four-line file: compiling Debian's full
///   list takes 15 s at every start; Hyperscan is off, so no helper
///   process spends a core compiling regular expressions in the
///   background (PCRE matches the same rules);
/// - `milter_headers` adds its informational headers for every message,
///   so a clean message shows what rspamd adds.
pub fn rspamd() -> Option<Rspamd> {
    let rspamd = program("rspamd")?;
    let rspamadm = program("rspamadm")?;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["db", "run", "local.d", "override.d"] {
        fs::create_dir(d.join(sub)).unwrap();
    }
    let port = free_port();
    fs::write(d.join("tld.dat"), "org\ncom\nnet\nexample\n").unwrap();
    fs::write(
        d.join("rspamd.conf"),
        format!(
            r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    filters = "chartable,dkim,regexp";
    url_tld = "{tld}";
    hs_cache_dir = "$DBDIR/";
    control_socket = "$DBDIR/rspamd.sock mode=0600";
    stats_file = "$DBDIR/stats.ucl";
    history_file = "$DBDIR/rspamd.history";
    cache_file = "$DBDIR/symbols.cache";
    dynamic_conf = "$DBDIR/rspamd_dynamic";
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }}
    task_timeout = 8s;
    disable_hyperscan = true;
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 30s;
    count = 1;
    upstream "local" {{ default = yes; self_scan = yes; }}
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
"#,
            tld = d.join("tld.dat").display()
        ),
    )
    .unwrap();
    fs::write(d.join("override.d/fuzzy_check.conf"), "enabled = false;\n").unwrap();
    fs::write(
        d.join("local.d/milter_headers.conf"),
        "use = [\"x-spamd-result\", \"x-rspamd-server\", \"x-rspamd-queue-id\", \"x-spam-status\"];\n\
         skip_local = false;\nskip_authenticated = false;\n",
    )
    .unwrap();
    let vars = |c: &mut Command| {
        for (k, v) in [
            ("LOCAL_CONFDIR", d.to_path_buf()),
            ("DBDIR", d.join("db")),
            ("RUNDIR", d.join("run")),
            ("LOGDIR", d.to_path_buf()),
        ] {
            c.arg(format!("--var={k}={}", v.display()));
        }
    };
    let conf = d.join("rspamd.conf");

    let mut check = resolver_sandbox(d, &rspamadm);
    vars(&mut check);
    check.arg("configtest").arg("-c").arg(&conf);
    let out = check.output().expect("run rspamadm configtest");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("syntax OK"),
        "rspamadm configtest refused the config:\n{text}"
    );

    let mut cmd = Command::new(rspamd);
    // -f: stay in the foreground, our child; -i with -u/-g root: we are
    // root in CI, and rspamd refuses to run workers as root otherwise.
    cmd.args(["-f", "-i", "-u", "root", "-g", "root", "-c"])
        .arg(&conf);
    vars(&mut cmd);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut daemon = Daemon::spawn("rspamd", &mut cmd, d).also_log(d.join("rspamd.log"));
    daemon.wait_tcp(addr);
    Some(Rspamd { addr, daemon, dir })
}

/// `rspamadm` sets up its DNS resolver from /etc/resolv.conf before it
/// reads the config (the daemon uses the configured one), and opens a TCP
/// connection to it. Where a private mount namespace is allowed (root),
/// it gets a resolv.conf naming only loopback, so nothing leaves the
/// machine; elsewhere it runs as is.
fn resolver_sandbox(dir: &Path, program: &Path) -> Command {
    let resolv = dir.join("resolv.conf");
    fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let unshare_works = program_quiet("unshare").is_some_and(|u| {
        Command::new(u)
            .args(["-m", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !unshare_works {
        return Command::new(program);
    }
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ])
    .arg(&resolv)
    .arg(program);
    c
}

fn program_quiet(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

// ---- OpenDKIM ----

/// Where a private OpenDKIM listens.
pub enum DkimSocket {
    /// `inet:` on a free loopback port.
    Tcp,
    /// `unix:` in the temp dir.
    Unix,
}

/// A private OpenDKIM that signs mail from `example.org` with selector
/// `test`, using a key made for it by opendkim-genkey.
pub struct OpenDkim {
    /// `inet:127.0.0.1:PORT` or `unix:/…/opendkim.sock`.
    pub address: String,
    /// The public key record opendkim-genkey wrote (`test.txt`).
    pub public_txt: PathBuf,
    /// The process; declared before `dir` so it stops before its files go.
    pub daemon: Daemon,
    /// Config, key pair, socket.
    pub dir: tempfile::TempDir,
}

pub const DKIM_DOMAIN: &str = "example.org";
pub const DKIM_SELECTOR: &str = "test";

/// Starts OpenDKIM in signing mode on a TCP port or a UNIX socket:
///
/// ```text
/// Mode                s
/// Domain              example.org
/// Selector            test
/// KeyFile             <dir>/test.private
/// Canonicalization    simple/simple   (the strictest: header bytes must survive exactly)
/// InternalHosts       127.0.0.1   (mail from there is signed)
/// Socket              inet:PORT@127.0.0.1 | local:<dir>/opendkim.sock
/// PidFile             <dir>/opendkim.pid
/// Syslog              no
/// Background          no
/// RequireSafeKeys     false   (the temp dir is under /tmp, which others
///                              may write; OpenDKIM refuses such key paths)
/// ```
pub fn opendkim(socket: DkimSocket) -> Option<OpenDkim> {
    let opendkim = program("opendkim")?;
    let genkey = program("opendkim-genkey")?;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = Command::new(genkey)
        .arg("-D")
        .arg(d)
        .args(["-d", DKIM_DOMAIN, "-s", DKIM_SELECTOR, "-b", "2048"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "opendkim-genkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = d.join(format!("{DKIM_SELECTOR}.private"));
    // OpenDKIM refuses keys others may read.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let path = d.join("opendkim.sock");
    let (socket_line, address) = match socket {
        DkimSocket::Tcp => (
            format!("inet:{port}@127.0.0.1"),
            format!("inet:127.0.0.1:{port}"),
        ),
        DkimSocket::Unix => (
            format!("local:{}", path.display()),
            format!("unix:{}", path.display()),
        ),
    };
    let conf = d.join("opendkim.conf");
    fs::write(
        &conf,
        format!(
            "Mode s\n\
             Domain {DKIM_DOMAIN}\n\
             Selector {DKIM_SELECTOR}\n\
             KeyFile {key}\n\
             Canonicalization simple/simple\n\
             InternalHosts 127.0.0.1\n\
             Socket {socket_line}\n\
             PidFile {pid}\n\
             Syslog no\n\
             Background no\n\
             RequireSafeKeys false\n",
            key = key.display(),
            pid = d.join("opendkim.pid").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(opendkim);
    cmd.arg("-f").arg("-x").arg(&conf);
    let mut daemon = Daemon::spawn("opendkim", &mut cmd, d);
    match socket {
        DkimSocket::Tcp => daemon.wait_tcp(format!("127.0.0.1:{port}").parse().unwrap()),
        DkimSocket::Unix => daemon.wait_unix(&path),
    }
    Some(OpenDkim {
        address,
        public_txt: d.join(format!("{DKIM_SELECTOR}.txt")),
        daemon,
        dir,
    })
}

/// Verifies `message`'s DKIM signatures with dkimpy, answering its DNS
/// query for the key from opendkim-genkey's record file: no DNS involved.
/// Returns dkimpy's verdict and what it printed.
pub fn dkimpy_verify(python: &Path, message: &[u8], public_txt: &Path) -> (bool, String) {
    let script = r#"
import re, sys, dkim
record = open(sys.argv[1]).read()
txt = "".join(re.findall(r'"([^"]*)"', record)).encode()
name = sys.argv[2].encode()
def dnsfunc(qname, timeout=5):
    return txt if qname.rstrip(b".") == name else None
msg = sys.stdin.buffer.read()
ok = dkim.verify(msg, dnsfunc=dnsfunc)
print("verified" if ok else "FAILED")
sys.exit(0 if ok else 1)
"#;
    let name = format!("{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}");
    let mut child = Command::new(python)
        .args(["-c", script])
        .arg(public_txt)
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

// ---- postgrey ----

/// A private postgrey policy server.
pub struct Postgrey {
    /// `inet:127.0.0.1:PORT` or `unix:/…/postgrey.sock`.
    pub address: String,
    /// The process; declared before `dir` so it stops before its files go.
    pub daemon: Daemon,
    /// Database, whitelists, socket.
    pub dir: tempfile::TempDir,
}

/// How long postgrey greylists a new triplet in these tests. postgrey
/// counts whole seconds, so with 1 s an immediate retry could cross a
/// second boundary and pass; 2 s cannot.
pub const POSTGREY_DELAY: Duration = Duration::from_secs(2);

/// Starts postgrey with its database in a temp dir, a 2 s delay, empty
/// whitelists and no auto-whitelisting, over TCP (`unix: false`) or a
/// UNIX socket:
///
/// ```text
/// postgrey --inet=127.0.0.1:PORT | --unix=<dir>/postgrey.sock
///          --dbdir=<dir>/db --pidfile=<dir>/postgrey.pid
///          --delay=2 --max-age=1 --auto-whitelist-clients=0
///          --whitelist-clients=<dir>/empty --whitelist-recipients=<dir>/empty
///          --hostname=policy.test --user=root --group=root
/// ```
pub fn postgrey(unix: bool) -> Option<Postgrey> {
    let postgrey = program("postgrey")?;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("db")).unwrap();
    fs::write(d.join("empty"), "").unwrap();
    let mut cmd = Command::new(postgrey);
    let (address, listen) = if unix {
        let path = d.join("postgrey.sock");
        (
            format!("unix:{}", path.display()),
            format!("--unix={}", path.display()),
        )
    } else {
        let port = free_port();
        (
            format!("inet:127.0.0.1:{port}"),
            format!("--inet=127.0.0.1:{port}"),
        )
    };
    cmd.arg(listen)
        .arg(format!("--dbdir={}", d.join("db").display()))
        .arg(format!("--pidfile={}", d.join("postgrey.pid").display()))
        .arg(format!("--delay={}", POSTGREY_DELAY.as_secs()))
        .args(["--max-age=1", "--auto-whitelist-clients=0"])
        .arg(format!("--whitelist-clients={}", d.join("empty").display()))
        .arg(format!(
            "--whitelist-recipients={}",
            d.join("empty").display()
        ))
        .args([
            "--hostname=policy.test",
            "--user=root",
            "--group=root",
            "-v",
        ]);
    let mut daemon = Daemon::spawn("postgrey", &mut cmd, d);
    if unix {
        daemon.wait_unix(&d.join("postgrey.sock"));
    } else {
        let addr = address.strip_prefix("inet:").unwrap().parse().unwrap();
        daemon.wait_tcp(addr);
    }
    Some(Postgrey {
        address,
        daemon,
        dir,
    })
}
