//! `letterbox serve`: builds the runtime from the config and runs the
//! listeners until a signal says stop.

use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("serve is not implemented yet")
}
