//! PLACEHOLDER replaced by the delivery branch: same API, no durability.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::MaildirConfig;
use crate::directory::Mailbox;
use crate::envelope::Envelope;
use crate::spool::Spool;

#[derive(Clone, Debug)]
pub struct Maildirs {
    root: PathBuf,
}

pub struct Delivered {
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{mailbox} is over quota")]
    QuotaExceeded { mailbox: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Maildirs {
    pub fn new(config: &MaildirConfig, _hostname: &str) -> std::io::Result<Maildirs> {
        std::fs::create_dir_all(&config.root)?;
        Ok(Maildirs { root: config.root.clone() })
    }
    pub fn spool_dir(&self) -> PathBuf {
        self.root.clone()
    }
    pub fn clean_tmp(&self) -> std::io::Result<usize> {
        Ok(0)
    }
    pub async fn is_over_quota(&self, _mailbox: &Mailbox) -> std::io::Result<bool> {
        Ok(false)
    }
    pub async fn deliver(&self, envelope: &Envelope, spool: Arc<Spool>, mailboxes: &[Mailbox]) -> Result<Delivered, DeliveryError> {
        let mut paths = Vec::new();
        for m in mailboxes {
            let dir = self.root.join(&m.address.domain).join(&m.address.local).join("new");
            std::fs::create_dir_all(&dir).map_err(|source| DeliveryError::Io { path: dir.clone(), source })?;
            let path = dir.join(format!("{}.{}", envelope.id, paths.len()));
            let mut data = envelope.received_header(&m.address.to_string()).into_bytes();
            data.extend_from_slice(spool.as_memory().unwrap_or_default());
            std::fs::write(&path, data).map_err(|source| DeliveryError::Io { path: path.clone(), source })?;
            paths.push(path);
        }
        Ok(Delivered { paths })
    }
}
