//! `letterbox alias …`

use super::{AliasCmd, active_word, print_rows};
use crate::config::Config;
use crate::directory::Directory;

pub async fn run(dir: &Directory, config: &Config, cmd: AliasCmd) -> anyhow::Result<()> {
    let delim = config.subaddress_delimiter();
    match cmd {
        AliasCmd::Add {
            source,
            destinations,
        } => {
            let (source, dests) = dir.alias_add(&source, &destinations, delim).await?;
            println!("added alias {source} -> {}", dests.join(", "));
        }
        AliasCmd::List { domain, fmt } => {
            let rows = dir.alias_list(domain.as_deref()).await?;
            print_rows(&rows, fmt.json, |a| {
                format!(
                    "{}\t{}\t{}",
                    a.source,
                    active_word(a.active),
                    a.destinations.join(",")
                )
            })?;
        }
        AliasCmd::Remove {
            source,
            destination,
        } => {
            let source = dir
                .alias_remove(&source, destination.as_deref(), delim)
                .await?;
            match destination {
                Some(d) => println!("removed destination {d} from alias {source}"),
                None => println!("removed alias {source}"),
            }
        }
    }
    Ok(())
}
