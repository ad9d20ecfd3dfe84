//! `letterbox domain …`

use super::{DomainCmd, active_word, print_rows};
use crate::directory::Directory;

pub async fn run(dir: &Directory, cmd: DomainCmd) -> anyhow::Result<()> {
    match cmd {
        DomainCmd::Add { name } => println!("added domain {}", dir.domain_add(&name).await?),
        DomainCmd::List { fmt } => {
            let rows = dir.domain_list().await?;
            print_rows(&rows, fmt.json, |d| {
                format!(
                    "{}\t{}\t{} users\t{} aliases",
                    d.name,
                    active_word(d.active),
                    d.users,
                    d.aliases
                )
            })?;
        }
        DomainCmd::Remove { name, force } => {
            let d = dir.domain_remove(&name, force).await?;
            println!(
                "removed domain {} ({} users, {} aliases); mail on disk was kept",
                d.name, d.users, d.aliases
            );
        }
        DomainCmd::Enable { name } => println!(
            "enabled domain {}",
            dir.domain_set_active(&name, true).await?
        ),
        DomainCmd::Disable { name } => println!(
            "disabled domain {}",
            dir.domain_set_active(&name, false).await?
        ),
    }
    Ok(())
}
