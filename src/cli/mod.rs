//! The command line: `letterbox [--config FILE] <command>`. Each noun has
//! its own module with plain async functions; this file only defines the
//! arguments and dispatches.

mod alias;
mod check;
mod dkim;
mod domain;
mod queue;
mod sink;
mod user;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::directory::Directory;
use crate::units::{ByteSize, Duration};

/// A virtual-user maildir mail server backed by SQL.
#[derive(Debug, Parser)]
#[command(name = "letterbox", version, about)]
pub struct Cli {
    /// Config file (default: ./letterbox.toml, else /etc/letterbox/letterbox.toml, else built-in defaults).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SMTP server (and the sink's web page); migrates the database first.
    Serve,
    /// Apply pending database migrations.
    Migrate,
    /// Check the config, database, maildir root and TLS files; one line per check.
    Check,
    /// Manage served domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Manage mailboxes.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage aliases and domain catch-alls.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Manage the rules that route mail to the ephemeral sink.
    #[command(subcommand)]
    Sink(SinkCmd),
    /// Inspect and steer the outbound queue (works while the server runs).
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Manage the DKIM keys that sign mail sent by logged-in users.
    #[command(subcommand)]
    Dkim(DkimCmd),
}

#[derive(Debug, Args)]
pub struct ListFmt {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DomainCmd {
    /// Serve a domain.
    Add { name: String },
    /// List served domains.
    List {
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Stop serving a domain (mail on disk is kept).
    Remove {
        name: String,
        /// Also remove its users and aliases.
        #[arg(long)]
        force: bool,
    },
    /// Accept mail for a disabled domain again.
    Enable { name: String },
    /// Refuse mail for a domain without removing it.
    Disable { name: String },
}

#[derive(Debug, Args)]
pub struct PasswordSource {
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a mailbox; without a password flag it is receive-only.
    Add {
        address: String,
        #[command(flatten)]
        password: PasswordSource,
        /// Quota such as 500M or 2G; 0 = unlimited.
        #[arg(long, default_value = "0")]
        quota: ByteSize,
    },
    /// List mailboxes, optionally of one domain.
    List {
        domain: Option<String>,
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Remove a mailbox (its mail stays on disk).
    Remove { address: String },
    /// Set a password: prompted on a terminal, or --password-stdin.
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Accept mail and logins for a disabled mailbox again.
    Enable { address: String },
    /// Refuse mail and logins without removing the mailbox.
    Disable { address: String },
    /// Set the quota (500M, 2G, bytes; 0 = unlimited).
    Quota { address: String, size: ByteSize },
}

#[derive(Debug, Subcommand)]
pub enum AliasCmd {
    /// Point SOURCE (local@domain, or @domain for a catch-all) at local mailboxes, aliases,
    /// pipe commands ('|/path/to/program args', split on spaces, run without a shell), or
    /// one address on another server (forwarded through the outbound queue). A mailbox may
    /// be SOURCE when its own address is among the destinations.
    Add {
        source: String,
        #[arg(required = true)]
        destinations: Vec<String>,
    },
    /// List aliases, optionally of one domain.
    List {
        domain: Option<String>,
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Remove an alias, or one destination of it.
    Remove {
        source: String,
        destination: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SinkCmd {
    /// Route PATTERN (`*.tmp.example.org` or an exact domain) to the sink.
    Add {
        pattern: String,
        /// How long messages are kept (30s, 10m, 1h, 2d); default: sink.default_ttl.
        #[arg(long)]
        ttl: Option<Duration>,
    },
    /// List sink rules.
    List {
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Remove a sink rule.
    Remove { pattern: String },
}

#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    /// List queued messages and where each recipient stands.
    List {
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Show one queued message: its recipients and its header.
    Show {
        id: String,
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Try the queued recipients of an entry (or of every entry) now.
    Retry {
        id: Option<String>,
        /// Every entry in the queue.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete an entry; its sender is not told.
    Remove { id: String },
    /// Give up on an entry's queued recipients and send its sender a DSN.
    Bounce { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DkimCmd {
    /// Make a signing key for DOMAIN, store it, and print the DNS TXT record to publish.
    ///
    /// The oldest key of each algorithm signs: to rotate, make a new key,
    /// publish its record, then remove the old key.
    Keygen {
        domain: String,
        /// The selector, a DNS label (default: today's date and the algorithm, 20260715-rsa).
        #[arg(long)]
        selector: Option<String>,
        /// rsa (2048 bits, verified everywhere) or ed25519 (RFC 8463); a domain may have both.
        #[arg(long, value_enum, default_value_t = crate::dkim::Algorithm::Rsa)]
        algorithm: crate::dkim::Algorithm,
    },
    /// Print the DNS TXT records of DOMAIN's keys (or of one selector), one zone-file line each.
    Dns {
        domain: String,
        selector: Option<String>,
    },
    /// List DKIM keys, optionally of one domain.
    List {
        domain: Option<String>,
        #[command(flatten)]
        fmt: ListFmt,
    },
    /// Remove a key; mail is no longer signed with it (remove its DNS record later).
    Remove { domain: String, selector: String },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, file) = Config::load(cli.config.as_deref())?;
    // `serve` logs them once its log is set up.
    if !matches!(cli.command, Command::Serve) {
        for warning in config.warnings() {
            eprintln!("letterbox: warning: {warning}");
        }
    }
    match cli.command {
        Command::Check => check::run(&config, file.as_deref()).await,
        Command::Serve => crate::serve::run(config).await,
        Command::Migrate => {
            let dir = open(&config).await?;
            dir.migrate().await?;
            println!(
                "database {} is migrated",
                crate::directory::redact(&config.database.url)
            );
            Ok(())
        }
        Command::Domain(cmd) => domain::run(&open_migrated(&config).await?, cmd).await,
        Command::User(cmd) => user::run(&open_migrated(&config).await?, &config, cmd).await,
        Command::Alias(cmd) => alias::run(&open_migrated(&config).await?, &config, cmd).await,
        Command::Sink(cmd) => sink::run(&open_migrated(&config).await?, &config, cmd).await,
        Command::Queue(cmd) => queue::run(&config, cmd).await,
        Command::Dkim(cmd) => dkim::run(&open_migrated(&config).await?, cmd).await,
    }
}

async fn open(config: &Config) -> anyhow::Result<Directory> {
    // Admin commands never cache: they read what they just wrote.
    Ok(Directory::connect(&config.database.url, 2, std::time::Duration::ZERO).await?)
}

/// Opens the directory for an admin command, migrating a fresh SQLite file
/// so that a newcomer's first `domain add` just works.
async fn open_migrated(config: &Config) -> anyhow::Result<Directory> {
    let dir = open(config).await?;
    if dir.check_migrated().await.is_err() {
        dir.migrate()
            .await
            .context("the database needed migrating")?;
    }
    Ok(dir)
}

/// Prints rows as JSON or as tab-separated lines.
fn print_rows<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        for r in rows {
            println!("{}", line(r));
        }
    }
    Ok(())
}

fn active_word(active: bool) -> &'static str {
    if active { "active" } else { "disabled" }
}
