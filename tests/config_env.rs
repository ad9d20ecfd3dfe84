//! The environment around the real binary: `LETTERBOX_…` variables that
//! are not configuration are ignored with a warning (in the log for
//! `serve`, on stderr for the admin commands) while a misspelt key of a
//! section is still an error; the log is coloured only on a terminal and
//! never under `NO_COLOR`; `check` reports the LMTP listeners and warns
//! about a public one.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{Process, Sections, admin, letterbox, write_config};

/// How long to wait for a log line before failing.
const PATIENCE: Duration = Duration::from_secs(30);

const BIN_WARNING: &str = "ignoring environment variable LETTERBOX_BIN (not a configuration key)";

/// A temporary directory with a config file and a migrated database.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("sqlite://{}", dir.path().join("letterbox.db").display()),
        &Sections::default(),
    );
    admin(&config, &["migrate"]);
    (dir, config)
}

fn run(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("run letterbox")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn an_admin_command_ignores_a_stray_variable_with_a_warning() {
    let (_dir, config) = setup();
    let mut command = letterbox(&config);
    command
        .env("LETTERBOX_BIN", "/usr/bin/letterbox")
        // Reserved for the test suites: ignored without a word.
        .env("LETTERBOX_TEST_SOMETHING", "1")
        .args(["domain", "add", "example.org"]);
    let out = run(command);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "added domain example.org\n");
    assert_eq!(
        text(&out.stderr),
        format!("letterbox: warning: {BIN_WARNING}\n")
    );

    // One line per variable, in name order; the prefix in any case counts.
    let mut command = letterbox(&config);
    command
        .env("LETTERBOX_BIN", "/usr/bin/letterbox")
        .env("letterbox_home", "/var/lib/letterbox")
        .arg("check");
    let out = run(command);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!(
            "letterbox: warning: {BIN_WARNING}\n\
             letterbox: warning: ignoring environment variable letterbox_home (not a configuration key)\n"
        )
    );
}

#[test]
fn a_section_variable_is_still_checked_strictly() {
    let (_dir, config) = setup();
    let mut command = letterbox(&config);
    command.env("LETTERBOX_SMTP__LISTN", "x").arg("check");
    let out = run(command);
    assert!(!out.status.success());
    assert_eq!(text(&out.stdout), "");
    // figment lists the keys it expected; the list grows with the section.
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("letterbox: unknown field: found `listn`, expected `one of `listen`, ")
            && stderr
                .ends_with(" for key \"SMTP.LISTN\" in `LETTERBOX_` environment variable(s)\n"),
        "{stderr}"
    );

    // A top-level key is configuration too, with its own checks.
    let mut command = letterbox(&config);
    command.env("LETTERBOX_HOSTNAME", "mx example").arg("check");
    let out = run(command);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "letterbox: config: hostname \"mx example\" must be a non-empty name without spaces\n"
    );
}

#[test]
fn serve_logs_one_warning_per_ignored_variable() {
    let (_dir, config) = setup();
    let server = Process::serve_with(&config, |c| {
        c.env("LETTERBOX_BIN", "/usr/bin/letterbox")
            .env("LETTERBOX_HOME", "/var/lib/letterbox")
            .env("LETTERBOX_TEST_SOMETHING", "1")
            .env_remove("NO_COLOR");
    });
    let home = "ignoring environment variable LETTERBOX_HOME (not a configuration key)";
    let log = server.wait_log(home, PATIENCE);
    let warnings: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once(" WARN letterbox::logging: ").map(|(_, m)| m))
        .collect();
    assert_eq!(warnings, [BIN_WARNING, home], "{log}");
    assert!(!log.contains("LETTERBOX_TEST_SOMETHING"), "{log}");
}

#[test]
fn the_log_on_a_pipe_has_no_colour() {
    let (_dir, config) = setup();
    // NO_COLOR removed: the pipe alone must be enough.
    let server = Process::serve_with(&config, |c| {
        c.env_remove("NO_COLOR");
    });
    server.signal(libc::SIGHUP);
    let log = server.wait_log("SIGHUP: no TLS configured", PATIENCE);
    assert!(!log.contains('\x1b'), "{log:?}");
}

#[test]
fn the_log_on_a_terminal_is_coloured_unless_no_color() {
    let (_dir, config) = setup();
    let log = serve_on_a_terminal(&config, None);
    assert!(log.contains("\x1b["), "{log:?}");
    let log = serve_on_a_terminal(&config, Some("1"));
    assert!(!log.contains('\x1b'), "{log:?}");
    // An empty NO_COLOR does not count (https://no-color.org).
    let log = serve_on_a_terminal(&config, Some(""));
    assert!(log.contains("\x1b["), "{log:?}");
}

/// Runs `serve` with its stderr on a pseudo-terminal and `NO_COLOR` as
/// given, makes it log a line (SIGHUP) and returns what it logged.
fn serve_on_a_terminal(config: &Path, no_color: Option<&str>) -> String {
    let (master, slave) = open_pty();
    let mut command = letterbox(config);
    match no_color {
        Some(v) => command.env("NO_COLOR", v),
        None => command.env_remove("NO_COLOR"),
    };
    let mut child = command
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn letterbox serve");
    // Closes our copy of the slave, so that the child holds the only one.
    drop(command);
    let log = Arc::new(Mutex::new(Vec::new()));
    {
        let (mut master, log) = (File::from(master), log.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // Drains stdout for the process's whole life: a closed pipe would make
    // the server's next println! fail.
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "letterbox: ready" => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "serve did not start: {}",
                    String::from_utf8_lossy(&log.lock().unwrap())
                );
            }
        }
    }
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        if text.contains("SIGHUP: no TLS configured") {
            break text;
        }
        assert!(Instant::now() < deadline, "log never said it: {text:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

/// A new pseudo-terminal: (master, slave).
fn open_pty() -> (OwnedFd, OwnedFd) {
    // SAFETY: plain libc calls on descriptors we own; ptsname_r writes at
    // most buf.len() bytes into buf.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt");
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let mut buf = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()),
            0,
            "ptsname_r"
        );
        let slave = libc::open(
            buf.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0, "open the pty slave");
        (master, OwnedFd::from_raw_fd(slave))
    }
}

/// `check` with these extra lines in the config file; (exit ok, stdout).
fn check_with(extra: &str) -> (bool, String, tempfile::TempDir) {
    let (dir, config) = setup();
    let mut file = std::fs::read_to_string(&config).unwrap();
    file.push_str(extra);
    std::fs::write(&config, file).unwrap();
    let mut command = letterbox(&config);
    command.arg("check");
    let out = run(command);
    assert_eq!(text(&out.stderr), "");
    (out.status.success(), text(&out.stdout), dir)
}

/// The lines `check` prints before its LMTP lines, for a [`setup`] in `dir`.
/// The last line of `check` when nothing asks DNS (write_config's servers).
const DNS_UNUSED: &str = "ok    dns: not used (smtp.reverse_dns, [auth] and [[dnsbl]] are off)\n";

fn check_head(dir: &Path) -> String {
    format!(
        "ok    config: loaded {config}\n\
         ok    database: sqlite://{db} reachable and migrated\n\
         ok    maildir root: {root} is writable\n\
         ok    tls: not configured; STARTTLS will not be offered\n",
        config = dir.join("letterbox.toml").display(),
        db = dir.join("letterbox.db").display(),
        root = dir.join("mail").display(),
    )
}

#[test]
fn an_lmtp_variable_is_checked_like_the_file() {
    let (_dir, config) = setup();
    let mut command = letterbox(&config);
    command
        .env("LETTERBOX_LMTP__LISTEN", r#"["lmtp.sock"]"#)
        .arg("check");
    let out = run(command);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "letterbox: invalid listen address \"lmtp.sock\": expected IP:PORT (127.0.0.1:2424, [::1]:2424) \
         or unix:/ABSOLUTE/PATH for key \"LMTP.LISTEN.0\" in `LETTERBOX_` environment variable(s)\n"
    );
}

#[test]
fn check_says_lmtp_is_off_by_default() {
    let (ok, stdout, dir) = check_with("");
    assert!(ok);
    assert_eq!(
        stdout,
        check_head(dir.path()) + "ok    lmtp: off\n" + DNS_UNUSED
    );
}

#[test]
fn check_warns_about_a_public_lmtp_address_without_failing() {
    let (ok, stdout, dir) = check_with(
        "[lmtp]\nlisten = [\"127.0.0.1:2424\", \"unix:/run/letterbox/lmtp.sock\", \
         \"0.0.0.0:2424\", \"[::ffff:127.0.0.1]:2425\", \"[2001:db8::1]:24\"]\n",
    );
    assert!(ok, "{stdout}");
    assert_eq!(
        stdout,
        check_head(dir.path())
            + "ok    lmtp: 127.0.0.1:2424 is a loopback address\n\
               ok    lmtp: unix:/run/letterbox/lmtp.sock is a local socket\n\
               WARN  lmtp: 0.0.0.0:2424 is not a loopback address; LMTP has no authentication, so anyone who can reach it can deliver mail\n\
               ok    lmtp: [::ffff:127.0.0.1]:2425 is a loopback address\n\
               WARN  lmtp: [2001:db8::1]:24 is not a loopback address; LMTP has no authentication, so anyone who can reach it can deliver mail\n"
            + DNS_UNUSED
    );
}
