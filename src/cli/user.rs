//! `letterbox user …`

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};

use super::{UserCmd, active_word, print_rows};
use crate::config::Config;
use crate::directory::Directory;
use crate::password;
use crate::units::ByteSize;

pub async fn run(dir: &Directory, config: &Config, cmd: UserCmd) -> anyhow::Result<()> {
    let delim = config.subaddress_delimiter();
    match cmd {
        UserCmd::Add {
            address,
            password,
            quota,
        } => {
            let hash = if password.password_stdin {
                Some(hash_blocking(read_stdin_password()?).await?)
            } else {
                None
            };
            let addr = dir
                .user_add(&address, delim, hash.as_deref(), quota.0)
                .await?;
            let kind = if hash.is_some() {
                ""
            } else {
                " (receive-only: no password)"
            };
            println!("added user {addr}{kind}");
        }
        UserCmd::List { domain, fmt } => {
            let rows = dir.user_list(domain.as_deref()).await?;
            print_rows(&rows, fmt.json, |u| {
                let quota = if u.quota == 0 {
                    "unlimited".into()
                } else {
                    ByteSize(u.quota as u64).to_string()
                };
                let login = if u.receive_only {
                    "receive-only"
                } else {
                    "login"
                };
                format!(
                    "{}\t{}\t{login}\tquota {quota}",
                    u.address,
                    active_word(u.active)
                )
            })?;
        }
        UserCmd::Remove { address } => {
            let (addr, aliases, own) = dir.user_remove(&address, delim).await?;
            let path = config.maildir.root.join(&addr.domain).join(&addr.local);
            println!("removed user {addr}; its mail stays in {}", path.display());
            if aliases > 0 {
                println!("removed {aliases} alias destination(s) that pointed to it");
            }
            if own > 0 {
                println!("removed its own alias ({own} destination(s))");
            }
        }
        UserCmd::Passwd { address, password } => {
            let plain = if password.password_stdin {
                read_stdin_password()?
            } else {
                prompt_password()?
            };
            let hash = hash_blocking(plain).await?;
            println!(
                "password of {} changed",
                dir.user_set_password(&address, delim, &hash).await?
            );
        }
        UserCmd::Enable { address } => println!(
            "enabled user {}",
            dir.user_set_active(&address, delim, true).await?
        ),
        UserCmd::Disable { address } => println!(
            "disabled user {}",
            dir.user_set_active(&address, delim, false).await?
        ),
        UserCmd::Quota { address, size } => {
            let addr = dir.user_set_quota(&address, delim, size.0).await?;
            let shown = if size.0 == 0 {
                "unlimited".into()
            } else {
                size.to_string()
            };
            println!("quota of {addr} set to {shown}");
        }
    }
    Ok(())
}

/// Argon2 takes tens of milliseconds of CPU: keep it off the runtime.
async fn hash_blocking(plain: String) -> anyhow::Result<String> {
    Ok(tokio::task::spawn_blocking(move || password::hash(&plain)).await??)
}

fn read_stdin_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        bail!("no password on standard input");
    }
    Ok(pw.to_string())
}

fn prompt_password() -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "standard input is not a terminal; pass --password-stdin to read the password from it"
        );
    }
    let first = rpassword::prompt_password("New password: ")?;
    let second = rpassword::prompt_password("Repeat password: ")?;
    if first != second {
        bail!("the passwords do not match; nothing was changed");
    }
    Ok(first)
}
