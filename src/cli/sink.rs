//! `letterbox sink …`

use super::{SinkCmd, active_word, print_rows};
use crate::config::Config;
use crate::directory::Directory;
use crate::units::Duration;

pub async fn run(dir: &Directory, config: &Config, cmd: SinkCmd) -> anyhow::Result<()> {
    match cmd {
        SinkCmd::Add { pattern, ttl } => {
            let ttl = ttl.unwrap_or(config.sink.default_ttl);
            let pattern = dir.sink_add(&pattern, ttl.as_secs()).await?;
            println!("added sink rule {pattern} (ttl {ttl})");
        }
        SinkCmd::List { fmt } => {
            let rows = dir.sink_list().await?;
            print_rows(&rows, fmt.json, |r| {
                let ttl = Duration::from_secs(r.ttl_seconds as u64);
                format!("{}\t{}\tttl {ttl}", r.pattern, active_word(r.active))
            })?;
        }
        SinkCmd::Remove { pattern } => {
            println!("removed sink rule {}", dir.sink_remove(&pattern).await?)
        }
    }
    Ok(())
}
