//! The operational files agree with the code and with each other:
//! config/letterbox.toml is complete and holds the defaults, and
//! docker-compose.yml, the Dockerfile and the config wiring match (no Docker
//! engine runs here, so the compose file is parsed and checked instead).

use std::collections::BTreeSet;
use std::path::Path;

use assert_cmd::Command;
use figment::Figment;
use figment::providers::{Format, Toml};
use letterbox::config::Config;
use serde_json::Value;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Dotted paths of every leaf of a JSON value (`smtp.listen`, …).
fn leaves(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&path, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[test]
fn example_config_has_every_key_with_its_default() {
    let text = repo("config/letterbox.toml");
    let file: Config = Figment::from(Toml::string(&text))
        .extract()
        .expect("config/letterbox.toml parses as a Config");
    let mut from_file = serde_json::to_value(&file).unwrap();
    let mut default = serde_json::to_value(Config::default()).unwrap();
    // The hostname defaults to the machine's name; the example shows it
    // commented out, as it does tls.cert and tls.key (unset by default).
    for v in [&mut from_file, &mut default] {
        v.as_object_mut().unwrap().remove("hostname");
    }
    assert_eq!(
        from_file, default,
        "config/letterbox.toml must hold the built-in defaults"
    );

    // Every key of the code is written out in the file (set or commented).
    let mut keys = BTreeSet::new();
    leaves(
        "",
        &serde_json::to_value(Config::default()).unwrap(),
        &mut keys,
    );
    keys.extend(["tls.cert".to_string(), "tls.key".to_string()]);
    let mut section = String::new();
    let mut written = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            // An array of tables (`[[hooks]]`) writes the array itself.
            written.insert(name.to_string());
            section = format!("{name}.");
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((key, _)) = line.split_once(" = ") {
            written.insert(format!("{section}{key}"));
        }
    }
    written.insert("hostname".into()); // above the first section
    let missing: Vec<_> = keys.difference(&written).collect();
    assert!(
        missing.is_empty(),
        "keys missing from config/letterbox.toml: {missing:?}"
    );
    assert!(text.contains("# hostname = "));
}

#[test]
fn the_binary_accepts_the_example_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/letterbox.toml");
    let mut c = Command::cargo_bin("letterbox").unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("LETTERBOX_") {
            c.env_remove(k);
        }
    }
    let out = c
        .current_dir(tmp.path())
        .arg("--config")
        .arg(&config)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tmp.path().join("letterbox.db").is_file());
}

type Yaml = serde_norway::Value;

fn compose() -> Yaml {
    serde_norway::from_str(&repo("docker-compose.yml")).expect("docker-compose.yml parses")
}

fn str_of(v: &Yaml) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

/// The host of a URL such as `postgres://u:p@host:5432/db`.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    host_port.split(':').next().unwrap()
}

/// Checks one letterbox service of the compose file; returns its environment.
fn check_letterbox_service(
    c: &Yaml,
    name: &str,
    db_service: &str,
    db_scheme: &str,
) -> Vec<(String, String)> {
    let services = &c["services"];
    let svc = &services[name];
    assert!(svc.is_mapping(), "service {name} exists");
    assert_eq!(
        str_of(&svc["build"]),
        ".",
        "{name} builds the Dockerfile at the root"
    );
    assert!(
        services[db_service].is_mapping(),
        "service {db_service} exists"
    );

    let env: Vec<(String, String)> = svc["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (str_of(k).to_string(), str_of(v).to_string()))
        .collect();
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name}: {k} is set"))
    };
    let url = get("LETTERBOX_DATABASE__URL");
    assert!(url.starts_with(db_scheme), "{name}: {url}");
    assert_eq!(
        url_host(&url),
        db_service,
        "{name}: the database URL names the database service"
    );

    // depends_on the database, once it is healthy; which has a healthcheck.
    assert_eq!(
        str_of(&svc["depends_on"][db_service]["condition"]),
        "service_healthy",
        "{name}"
    );
    assert!(
        services[db_service]["healthcheck"]["test"].is_sequence(),
        "{db_service} has a healthcheck"
    );
    assert!(
        svc["healthcheck"]["test"].is_sequence(),
        "{name} has a healthcheck"
    );

    // Host port 25 reaches the port letterbox listens on, and that port is
    // the one the Dockerfile exposes.
    let listen: Vec<String> = serde_json::from_str(&get("LETTERBOX_SMTP__LISTEN")).unwrap();
    let smtp_port = listen[0].rsplit_once(':').unwrap().1.to_string();
    let sink_port = get("LETTERBOX_SINK__HTTP_LISTEN")
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    let ports: Vec<&str> = svc["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(
        ports.contains(&format!("25:{smtp_port}").as_str()),
        "{name}: {ports:?}"
    );
    assert!(
        ports.contains(&format!("127.0.0.1:8025:{sink_port}").as_str()),
        "{name}: {ports:?}"
    );
    let exposed = dockerfile_exposed();
    assert!(
        exposed.contains(&smtp_port) && exposed.contains(&sink_port),
        "{exposed:?}"
    );

    // Mail lives on a named volume mounted at the maildir root.
    let root = get("LETTERBOX_MAILDIR__ROOT");
    let volumes: Vec<&str> = svc["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    let mail = volumes
        .iter()
        .find(|v| v.ends_with(&format!(":{root}")))
        .unwrap_or_else(|| panic!("{name}: no volume at {root}"));
    let volume = mail.split(':').next().unwrap();
    assert!(
        c["volumes"][volume].is_null() || c["volumes"][volume].is_mapping(),
        "{volume} is declared"
    );
    assert!(
        c["volumes"].as_mapping().unwrap().contains_key(volume),
        "{volume} is declared"
    );
    env
}

fn dockerfile_exposed() -> Vec<String> {
    repo("Dockerfile")
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect()
}

#[test]
fn compose_wires_letterbox_to_postgres_and_mariadb() {
    let c = compose();
    check_letterbox_service(&c, "letterbox", "postgres", "postgres://");
    check_letterbox_service(&c, "letterbox-mariadb", "mariadb", "mysql://");
    // The MariaDB variant is opt-in, as is its database.
    for svc in ["letterbox-mariadb", "mariadb"] {
        let profiles: Vec<&str> = c["services"][svc]["profiles"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(profiles, ["mariadb"], "{svc}");
    }
    assert!(
        c["services"]["letterbox"]["profiles"].is_null()
            && c["services"]["postgres"]["profiles"].is_null()
    );
}

#[test]
fn dockerfile_builds_and_runs_serve_as_non_root() {
    let d = repo("Dockerfile");
    assert!(d.contains("FROM rust:1.95-bookworm AS builder"));
    assert!(d.contains("FROM debian:bookworm-slim"));
    assert!(
        d.contains("COPY --from=builder /src/target/release/letterbox /usr/local/bin/letterbox")
    );
    let cmd = d
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    assert_eq!(cmd, ["/usr/local/bin/letterbox", "serve"]);
    let user = d
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert_ne!(user.trim(), "root");
    // What the build copies exists.
    for l in d
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
    {
        let mut parts: Vec<&str> = l.split_whitespace().collect();
        parts.pop();
        for src in parts {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(),
                "COPY {src}"
            );
        }
    }
}

#[test]
fn compose_environment_is_a_valid_config() {
    // The variables the compose file sets parse as letterbox's config (a
    // wrong key or type would fail before any check line is printed).
    let c = compose();
    let env = check_letterbox_service(&c, "letterbox", "postgres", "postgres://");
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::cargo_bin("letterbox").unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("LETTERBOX_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &env {
        cmd.env(k, v);
    }
    // No Docker network here: point the URL at a port nothing listens on.
    cmd.env(
        "LETTERBOX_DATABASE__URL",
        "postgres://letterbox@127.0.0.1:1/letterbox",
    );
    cmd.env("LETTERBOX_MAILDIR__ROOT", tmp.path().join("mail"));
    let out = cmd.current_dir(tmp.path()).arg("check").output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(stdout.starts_with("ok    config: "), "{stdout}{stderr}");
    // A misspelt section (LETTERBOX_DATABSE__URL) is not an error, only
    // ignored with a warning: the compose file must draw none.
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn ci_script_runs_the_readme_checks() {
    let ci = repo(".ci/run");
    assert!(ci.starts_with("#!/usr/bin/env bash\n"));
    assert!(ci.contains("set -euo pipefail"));
    for line in [
        "cargo fmt --check",
        "cargo clippy --all-targets -- -D warnings",
        "cargo test",
    ] {
        assert!(ci.lines().any(|l| l.trim() == line), "{line}");
    }
    let readme = repo("README.md");
    assert!(readme.contains("cargo run --release -- serve") && readme.contains("cargo test"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"))
        .unwrap()
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, ".ci/run is executable");

    // The README's apt-get line installs what CI installs.
    let ci_packages: Vec<&str> = ci
        .split_once("packages=(")
        .unwrap()
        .1
        .split(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let apt = readme
        .lines()
        .find(|l| l.starts_with("apt-get install -y "))
        .expect("README has the apt-get line");
    let apt: Vec<&str> = apt.split_whitespace().skip(3).collect();
    assert_eq!(apt, ci_packages);
}
