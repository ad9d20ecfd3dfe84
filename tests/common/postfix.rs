//! A private Postfix for one test: its own config, queue and data
//! directories under one short temporary directory, `smtpd` on a free
//! loopback port, a maillog file to read, and `example.org` handed to the
//! transport the test names (letterbox over LMTP). The system instance's
//! main.cf and master.cf in /etc/postfix are never read or touched (the
//! benchmark uses that instance); only the package's own metadata there
//! (postfix-files) is read, by `postfix start`'s checks. Parallel tests
//! never share a directory or a port. Stopped when dropped,
//! panics included.
//!
//! Postfix's master starts as root and drops to the `postfix` user, so
//! this takes root, as CI has. When Postfix is not installed the suite is
//! left out with a note, except under `CI=true`, where it fails: CI must
//! never pass by skipping it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a wait on Postfix may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The name the instance gives itself (LHLO, its Received header).
pub const HOSTNAME: &str = "relay.test";

/// Whether this machine can run the Postfix suites. Without Postfix:
/// false with a note, or a failure under `CI=true`. Without root: a
/// failure, as for the other suites that need root.
pub fn installed() -> bool {
    let found = ["postfix", "postconf", "postqueue"]
        .iter()
        .all(|tool| sbin(tool).is_some());
    if !found {
        let why =
            "Postfix is not installed (Debian: apt-get install postfix; see README, Prerequisites)";
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{why}; under CI=true the Postfix suite must run, not be left out");
        }
        eprintln!("note: Postfix suite left out: {why}");
        return false;
    }
    // SAFETY: getuid has no preconditions.
    assert_eq!(
        unsafe { libc::getuid() },
        0,
        "the Postfix suite needs root: Postfix's master starts as root and drops to the postfix user"
    );
    true
}

/// A Postfix command from the usual places (root's PATH has sbin, a
/// user's often has not).
fn sbin(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The uid and gid of the `postfix` user, which owns the queue and runs
/// the delivery agents (LMTP client included).
pub fn postfix_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postfix").unwrap();
    // SAFETY: a valid C string; the entry is read before any other getpw*
    // call on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no user postfix on this machine");
    // SAFETY: non-null, points to libc's static passwd entry.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A fresh directory for one instance, under /tmp whatever TMPDIR says:
/// it may also hold letterbox's LMTP socket, and a unix socket's path is
/// limited to 108 bytes (Postfix's own sockets live under it too). Mode
/// 0755: Postfix's processes, running as `postfix`, must reach inside.
pub fn workdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("lbpf")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Lets the `postfix` group connect to a unix socket (letterbox makes its
/// LMTP socket mode 0660, for the MTA's group to be given access).
pub fn give_postfix(socket: &Path) {
    let (_, gid) = postfix_ids();
    std::os::unix::fs::chown(socket, None, Some(gid)).unwrap();
}

/// A running private instance.
pub struct Postfix {
    /// The instance's root: `etc/` (main.cf, master.cf), `queue/`,
    /// `data/`, `maillog`. Removed after the instance stops.
    work: tempfile::TempDir,
    /// Where its `smtpd` listens, for injecting mail.
    pub smtp: SocketAddr,
    /// Cleared once the instance is stopped, so stopping twice is harmless.
    running: bool,
}

impl Postfix {
    /// Configures and starts an instance in `work` (from [`workdir`])
    /// that hands every recipient in example.org to `virtual_transport`
    /// (`lmtp:unix:/path` or `lmtp:inet:127.0.0.1:PORT`).
    pub fn start(work: tempfile::TempDir, virtual_transport: &str) -> Postfix {
        let dir = work.path().to_path_buf();
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // The queue directory is root's (`postfix start` makes its
        // subdirectories, owned by postfix); the data directory is
        // postfix's, for master.lock and the caches.
        let (uid, gid) = postfix_ids();
        std::os::unix::fs::chown(dir.join("data"), Some(uid), Some(gid)).unwrap();

        // smtpd cannot be given port 0: take a free port and release it
        // just before the master binds it. Another process may win it in
        // between; then try again with another.
        let mut last = String::new();
        for _attempt in 0..3 {
            let smtp = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            write_config(&dir.join("etc/main.cf"), &main_cf(&dir, virtual_transport));
            write_config(&dir.join("etc/master.cf"), &master_cf(smtp));
            // `postfix start` runs `master -w`: it returns once the master
            // has bound its sockets, or with the reason it could not.
            let out = postfix_command(&dir.join("etc"), &["start"]);
            if out.status.success() {
                return Postfix {
                    work,
                    smtp,
                    running: true,
                };
            }
            last = format!(
                "postfix start: {}\n{}{}\nmaillog:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("maillog")).unwrap_or_default(),
            );
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("the private Postfix did not start: {last}");
    }

    fn config_dir(&self) -> PathBuf {
        self.work.path().join("etc")
    }

    /// Runs `postqueue -c <etc> <args>` and returns its stdout; a failure
    /// fails the test, with the maillog.
    fn postqueue(&self, args: &[&str]) -> String {
        let out = tool("postqueue", &self.config_dir(), args);
        assert!(
            out.status.success(),
            "postqueue {args:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Everything the instance has logged so far.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.work.path().join("maillog")).unwrap_or_default()
    }

    /// Maillog lines about recipient `rcpt` (`to=<rcpt>`) that say
    /// `status=<status>`.
    pub fn log_lines(&self, rcpt: &str, status: &str) -> Vec<String> {
        let to = format!(" to=<{rcpt}>,");
        let status = format!(" status={status} ");
        self.maillog()
            .lines()
            .filter(|l| l.contains(&to) && l.contains(&status))
            .map(str::to_string)
            .collect()
    }

    /// The queue as `postqueue -j` reports it: one JSON object per message.
    pub fn queue(&self) -> Vec<Value> {
        self.postqueue(&["-j"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("postqueue -j: {e}: {l}")))
            .collect()
    }

    /// `postqueue -f`: attempt every queued message now.
    pub fn flush(&self) {
        self.postqueue(&["-f"]);
    }

    /// The maillog and the queue, for a failure message.
    pub fn diagnostics(&self) -> String {
        let queue = tool("postqueue", &self.config_dir(), &["-j"]);
        let queue = String::from_utf8_lossy(&queue.stdout);
        format!(
            "\n--- Postfix maillog ---\n{}--- Postfix queue (postqueue -j) ---\n{queue}",
            self.maillog()
        )
    }

    /// Polls `done` until it holds, up to [`PATIENCE`]; otherwise fails
    /// the test saying what it waited for, with the maillog and queue.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut(&Postfix) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {PATIENCE:?} waiting for {what}{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submits `content` (lines ending CRLF, not yet dot-stuffed) to the
    /// instance's smtpd for `rcpts`; returns the queue id Postfix gave it.
    pub fn send(&self, from: &str, rcpts: &[&str], content: &str) -> String {
        let mut smtp = Smtp::connect(self.smtp);
        smtp.expect("", "220 ");
        smtp.expect("EHLO client.example\r\n", "250");
        smtp.expect(&format!("MAIL FROM:<{from}> BODY=8BITMIME\r\n"), "250 ");
        for r in rcpts {
            smtp.expect(&format!("RCPT TO:<{r}>\r\n"), "250 ");
        }
        smtp.expect("DATA\r\n", "354 ");
        let reply = smtp.expect(&format!("{}.\r\n", dot_stuff(content)), "250 ");
        smtp.expect("QUIT\r\n", "221 ");
        reply
            .trim_end()
            .rsplit_once("queued as ")
            .unwrap_or_else(|| panic!("no queue id in {reply:?}"))
            .1
            .to_string()
    }

    /// Stops the instance (`postfix stop`, which waits for the master and
    /// kills its process group if it lingers). Idempotent.
    pub fn stop(&mut self) {
        if std::mem::take(&mut self.running) {
            let _ = postfix_command(&self.config_dir(), &["stop"]);
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a configuration file dated a minute ago. Postfix will not read
/// a file changed within the last two seconds (it may be half written):
/// it polls until the file is that old, which would add two seconds to
/// every start.
fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .unwrap();
}

/// Runs `postfix -c <config_dir> <args>`.
fn postfix_command(config_dir: &Path, args: &[&str]) -> Output {
    tool("postfix", config_dir, args)
}

/// How long one Postfix command may run (`postfix stop` alone may take
/// five seconds before it kills a master that does not stop).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `<name> -c <config_dir> <args>` and returns what it printed. A
/// command that outlives [`COMMAND_TIMEOUT`] (postqueue waits an hour for
/// a master that does not answer) is killed and fails the test.
fn tool(name: &str, config_dir: &Path, args: &[&str]) -> Output {
    let child = Command::new(sbin(name).unwrap_or_else(|| panic!("{name} is not installed")))
        .arg("-c")
        .arg(config_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{name}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (the thread
            // is still waiting for it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{name} {args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// RFC 5321 §4.5.2: a line starting with a dot gets one more.
pub fn dot_stuff(content: &str) -> String {
    content
        .split_inclusive("\r\n")
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}")
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// A blocking SMTP client for submitting to the instance.
struct Smtp {
    stream: BufReader<TcpStream>,
}

impl Smtp {
    fn connect(addr: SocketAddr) -> Smtp {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("Postfix's smtpd at {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        Smtp {
            stream: BufReader::new(s),
        }
    }

    /// Sends `out` (if any) and reads a whole reply, which must start with
    /// `want`.
    fn expect(&mut self, out: &str, want: &str) -> String {
        if !out.is_empty() {
            self.stream.get_mut().write_all(out.as_bytes()).unwrap();
        }
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .stream
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("reading Postfix's reply to {out:?}: {e}"));
            reply.push_str(&line);
            if n == 0 || line.len() < 4 || line.as_bytes()[3] != b'-' {
                break;
            }
        }
        let shown = if out.len() > 80 { "the content" } else { out };
        assert!(
            reply.starts_with(want),
            "Postfix answered {shown:?} with {reply:?}"
        );
        reply
    }
}

/// main.cf of an instance in `dir`. Everything not set here is Postfix's
/// compiled-in default, never the system instance's main.cf.
fn main_cf(dir: &Path, virtual_transport: &str) -> String {
    let dir = dir.display();
    format!(
        "# A private instance for one test: tests/common/postfix.rs\n\
         compatibility_level = 3.6\n\
         queue_directory = {dir}/queue\n\
         data_directory = {dir}/data\n\
         maillog_file = {dir}/maillog\n\
         maillog_file_prefixes = {dir}\n\
         myhostname = {HOSTNAME}\n\
         mydomain = {HOSTNAME}\n\
         myorigin = $myhostname\n\
         # Nothing is local: no aliases, no local(8) delivery.\n\
         mydestination =\n\
         alias_maps =\n\
         alias_database =\n\
         local_recipient_maps =\n\
         relay_domains =\n\
         relay_recipient_maps =\n\
         # Loopback only (smtpd's address and port are in master.cf).\n\
         inet_interfaces = 127.0.0.1\n\
         inet_protocols = ipv4\n\
         mynetworks = 127.0.0.0/8\n\
         smtpd_peername_lookup = no\n\
         # example.org goes to letterbox. An empty virtual_mailbox_maps\n\
         # lets every recipient through smtpd: letterbox decides at RCPT.\n\
         virtual_mailbox_domains = example.org\n\
         virtual_mailbox_maps =\n\
         virtual_alias_maps =\n\
         virtual_transport = {virtual_transport}\n\
         lmtp_host_lookup = native\n\
         smtp_host_lookup = native\n\
         # Anything else (there should be nothing) never leaves the machine.\n\
         default_transport = error:this test instance delivers only to example.org\n\
         # No retry of its own: a deferred copy goes again only when the\n\
         # test flushes the queue, so each delivery is one the test asked for.\n\
         queue_run_delay = 1h\n\
         minimal_backoff_time = 1h\n\
         maximal_backoff_time = 1h\n\
         biff = no\n"
    )
}

/// master.cf: smtpd on `smtp`, the services a queue needs, the LMTP
/// client, and postlogd for `maillog_file`. Nothing is chrooted: the LMTP
/// socket and the instance's own directories are reached by their real
/// paths.
fn master_cf(smtp: SocketAddr) -> String {
    format!(
        "\
# service type  private unpriv  chroot  wakeup  maxproc command
{smtp} inet n   -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
smtp      unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
    )
}
