//! The real `letterbox` binary as a child process: `serve` on port 0 with
//! a config file in a temporary directory, its stderr (the log) collected,
//! and admin commands run against the same config. For tests that need
//! what only a process has: signals, SIGKILL, file descriptors, RSS.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `serve` may take to print its listening addresses.
const STARTUP: Duration = Duration::from_secs(30);

/// A running `letterbox serve`. Killed when dropped.
pub struct Process {
    pub child: Child,
    /// The first SMTP listener.
    pub smtp: SocketAddr,
    /// The sink's web page, when `[sink] enabled = true`.
    pub http: Option<SocketAddr>,
    /// The config file it was started with.
    pub config: PathBuf,
    /// Everything written to stderr so far.
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// Lines a test adds to the sections of its config file.
#[derive(Default)]
pub struct Sections<'a> {
    pub database: &'a str,
    pub smtp: &'a str,
    pub tls: &'a str,
    pub maildir: &'a str,
    pub log: &'a str,
    /// `[auth]`; empty turns every method off, so no test asks DNS.
    pub auth: &'a str,
}

/// Writes `<dir>/letterbox.toml` for a test server: mx.example.org, the
/// directory at `db_url`, SMTP on 127.0.0.1:0 without reverse DNS or
/// sender authentication (unless `extra.auth` says otherwise), maildirs
/// in `<dir>/mail`, no sink page, plus `extra` in each section. Returns
/// its path.
pub fn write_config(dir: &Path, db_url: &str, extra: &Sections) -> PathBuf {
    let config = dir.join("letterbox.toml");
    let text = format!(
        "hostname = \"mx.example.org\"\n\
         [database]\nurl = \"{db_url}\"\n{database}\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nreverse_dns = false\n{smtp}\n\
         [tls]\n{tls}\n\
         [maildir]\nroot = \"{root}\"\n{maildir}\n\
         [sink]\nenabled = false\n\
         [log]\n{log}\n\
         [auth]\n{auth}\n{dns}",
        root = dir.join("mail").display(),
        database = extra.database,
        smtp = extra.smtp,
        tls = extra.tls,
        maildir = extra.maildir,
        log = extra.log,
        // A resolver on a closed loopback port: no lookup leaves the machine.
        dns = if [
            extra.database,
            extra.smtp,
            extra.tls,
            extra.maildir,
            extra.log,
            extra.auth
        ]
        .iter()
        .any(|e| e.contains("[dns]"))
        {
            ""
        } else {
            "[dns]\nservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n"
        },
        auth = if extra.auth.is_empty() {
            "spf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\narc = \"off\""
        } else {
            extra.auth
        },
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// The binary under test, with no `LETTERBOX_…` variable from outside (the
/// suites' `LETTERBOX_TEST_…` included), so only the config file counts.
pub fn letterbox(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_letterbox"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LETTERBOX_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c.arg("--config").arg(config);
    c
}

/// Runs an admin command (`["user", "add", …]`) and panics with its output
/// unless it succeeds; returns its stdout.
pub fn admin(config: &Path, args: &[&str]) -> String {
    let out = letterbox(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run letterbox");
    assert!(
        out.status.success(),
        "letterbox {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Process {
    /// Starts `letterbox --config <config> serve` and waits until it says
    /// it is ready, having printed where it listens.
    pub fn serve(config: &Path) -> Process {
        Process::serve_with(config, |_| {})
    }

    /// [`Process::serve`], letting `tweak` adjust the command first (say, a
    /// `pre_exec` that sets resource limits).
    pub fn serve_with(config: &Path, tweak: impl FnOnce(&mut Command)) -> Process {
        let mut command = letterbox(config);
        tweak(&mut command);
        let mut child = command
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn letterbox serve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let (mut pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            // Drains stdout for the process's whole life: a closed pipe
            // would make the server's next println! fail.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (mut smtp, mut http) = (None, None);
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let err = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
                    panic!("letterbox serve did not start: {err}");
                }
            };
            if line == "letterbox: ready" {
                break;
            } else if let Some(a) = line.strip_prefix("letterbox: smtp listening on ") {
                smtp.get_or_insert(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("letterbox: sink web page on http://") {
                http = Some(a.trim_end_matches('/').parse().unwrap());
            }
        }
        Process {
            child,
            smtp: smtp.expect("serve printed no SMTP address"),
            http,
            config: config.to_path_buf(),
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` (libc::SIGHUP, SIGTERM, SIGKILL…).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let r = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(r, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "letterbox did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Polls the log until it contains `needle`, up to `limit`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in bytes, from /proc/<pid>/status.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kb * 1024
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
