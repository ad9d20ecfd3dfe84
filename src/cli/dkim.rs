//! `letterbox dkim …`

use anyhow::bail;

use super::{DkimCmd, print_rows};
use crate::directory::Directory;
use crate::dkim;

pub async fn run(dir: &Directory, cmd: DkimCmd) -> anyhow::Result<()> {
    match cmd {
        DkimCmd::Keygen {
            domain,
            selector,
            algorithm,
        } => {
            let selector = selector.unwrap_or_else(|| {
                dkim::default_selector(algorithm, chrono::Utc::now().date_naive())
            });
            // Refuse a bad name or a taken selector before spending a
            // second of CPU on an RSA key.
            let selector = dkim::selector(&selector)?;
            let normalized = crate::address::domain_name(&domain)?;
            if dir
                .dkim_list(Some(&normalized))
                .await?
                .iter()
                .any(|k| k.selector == selector)
            {
                bail!(
                    "DKIM key {selector} of {normalized} exists already; choose another selector with --selector"
                );
            }
            let key =
                crate::blocking::run("generating a DKIM key", move || dkim::generate(algorithm))
                    .await??;
            let row = dir.dkim_add(&normalized, &selector, &key).await?;
            let bits = match algorithm {
                dkim::Algorithm::Rsa => format!(" {}", dkim::RSA_BITS),
                dkim::Algorithm::Ed25519 => String::new(),
            };
            let role = if row.signing {
                "it signs mail from now on"
            } else {
                "it signs once the older key is removed"
            };
            println!(
                "; added DKIM key {} of {} ({algorithm}{bits}); {role}. Publish this record:",
                row.selector, row.domain
            );
            println!("{}", row.dns_record());
        }
        DkimCmd::Dns { domain, selector } => {
            let keys = dir.dkim_list(Some(&domain)).await?;
            let name = crate::address::domain_name(&domain)?;
            let keys: Vec<_> = match &selector {
                Some(s) => {
                    let s = dkim::selector(s)?;
                    let found: Vec<_> = keys.into_iter().filter(|k| k.selector == s).collect();
                    if found.is_empty() {
                        bail!("DKIM key {s} of {name} does not exist");
                    }
                    found
                }
                None => keys,
            };
            if keys.is_empty() {
                bail!("{name} has no DKIM key; make one with `letterbox dkim keygen {name}`");
            }
            for k in keys {
                println!("{}", k.dns_record());
            }
        }
        DkimCmd::List { domain, fmt } => {
            let rows = dir.dkim_list(domain.as_deref()).await?;
            print_rows(&rows, fmt.json, |k| {
                format!(
                    "{}\t{}\t{}\t{}\t{}",
                    k.domain,
                    k.selector,
                    k.algorithm,
                    k.created,
                    if k.signing { "signing" } else { "waiting" }
                )
            })?;
        }
        DkimCmd::Remove { domain, selector } => {
            let k = dir.dkim_remove(&domain, &selector).await?;
            println!(
                "removed DKIM key {} of {}; its record {}._domainkey.{}. can go once mail signed with it is delivered",
                k.selector, k.domain, k.selector, k.domain
            );
        }
    }
    Ok(())
}
