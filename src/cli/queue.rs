//! `letterbox queue …`: the outbound queue, read and changed on disk while
//! the server runs. Each change takes the entry's lock (an entry being
//! delivered right now is reported busy, never waited for), rewrites its
//! state file atomically, and pokes the server's `wake` socket so it reads
//! the queue again at once; without a server the next start reads it.

use serde::Serialize;

use super::{QueueCmd, print_rows};
use crate::config::Config;
use crate::queue::entry::{self, Entry, Status};
use crate::queue::{Queue, QueueError};

/// One entry as `list --json` and `show --json` print it.
#[derive(Debug, Serialize)]
pub struct EntryView {
    pub id: String,
    /// The reverse-path; empty for a bounce.
    pub sender: String,
    /// Bytes of the queued message.
    pub size: u64,
    /// RFC 3339, UTC.
    pub created: String,
    pub recipients: Vec<RecipientView>,
}

#[derive(Debug, Serialize)]
pub struct RecipientView {
    pub address: String,
    /// `queued`, `delivered` or `failed`.
    pub status: &'static str,
    pub attempts: u32,
    /// RFC 3339, UTC; null unless queued.
    pub next_attempt: Option<String>,
    pub last_error: Option<String>,
}

impl From<&Entry> for EntryView {
    fn from(e: &Entry) -> EntryView {
        EntryView {
            id: e.id.clone(),
            sender: e.sender.clone(),
            size: e.size,
            created: entry::rfc3339(e.created),
            recipients: e
                .recipients
                .iter()
                .map(|r| RecipientView {
                    address: r.address.clone(),
                    status: r.status.as_str(),
                    attempts: r.attempts,
                    next_attempt: (r.status == Status::Queued)
                        .then(|| entry::rfc3339(r.next_attempt)),
                    last_error: r.last_error.clone(),
                })
                .collect(),
        }
    }
}

pub async fn run(config: &Config, cmd: QueueCmd) -> anyhow::Result<()> {
    let dir = config.queue_dir();
    let queue =
        crate::blocking::run("opening the queue", move || Queue::open_existing(&dir)).await??;
    let Some(queue) = queue else {
        return match cmd {
            QueueCmd::List { fmt } => print_rows::<EntryView>(&[], fmt.json, |_| String::new()),
            QueueCmd::Retry { id: None, .. } => {
                println!("the queue is empty");
                Ok(())
            }
            QueueCmd::Show { id, .. }
            | QueueCmd::Retry { id: Some(id), .. }
            | QueueCmd::Remove { id }
            | QueueCmd::Bounce { id } => Err(QueueError::NotFound(id).into()),
        };
    };
    match cmd {
        QueueCmd::List { fmt } => {
            let q = queue.clone();
            let entries = crate::blocking::run("reading the queue", move || q.scan()).await??;
            let views: Vec<EntryView> = entries.iter().map(EntryView::from).collect();
            print_rows(&views, fmt.json, human)?;
        }
        QueueCmd::Show { id, fmt } => {
            let q = queue.clone();
            let (entry, header) = crate::blocking::run("reading a queue entry", move || {
                let entry = q.read_state(&id)?;
                let mut buf = Vec::new();
                use std::io::Read as _;
                q.open_message(&id)?
                    .take(crate::queue::dsn::MAX_HEADERS as u64 + 4)
                    .read_to_end(&mut buf)
                    .map_err(|source| QueueError::Io {
                        path: q.message_path(&id),
                        source,
                    })?;
                let header = crate::queue::dsn::header_section(&buf).to_vec();
                Ok::<_, QueueError>((entry, header))
            })
            .await??;
            let view = EntryView::from(&entry);
            if fmt.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", human(&view));
                println!();
                print!("{}", String::from_utf8_lossy(&header).replace("\r\n", "\n"));
            }
        }
        QueueCmd::Retry { id, all } => {
            let ids = match (id, all) {
                (Some(id), _) => vec![id],
                (None, true) => {
                    let q = queue.clone();
                    crate::blocking::run("reading the queue", move || q.scan())
                        .await??
                        .into_iter()
                        .map(|e| e.id)
                        .collect()
                }
                (None, false) => anyhow::bail!("name an entry, or pass --all"),
            };
            let single = ids.len() == 1 && !all;
            for id in ids {
                let q = queue.clone();
                let i = id.clone();
                let r = crate::blocking::run("rescheduling a queue entry", move || {
                    change(&q, &i, |e| {
                        let now = entry::now();
                        let mut n = 0;
                        for r in e
                            .recipients
                            .iter_mut()
                            .filter(|r| r.status == Status::Queued)
                        {
                            r.next_attempt = now;
                            n += 1;
                        }
                        n
                    })
                })
                .await?;
                match r {
                    Ok(n) => println!("{id}: {n} recipient(s) will be tried now"),
                    Err(QueueError::Busy(_)) if !single => {
                        println!("{id}: being delivered right now")
                    }
                    Err(QueueError::NotFound(_)) if !single => {}
                    Err(e) => return Err(e.into()),
                }
            }
            queue.poke();
        }
        QueueCmd::Remove { id } => {
            let q = queue.clone();
            let i = id.clone();
            crate::blocking::run("removing a queue entry", move || {
                let lock = q.lock(&i)?;
                q.remove(&lock)
            })
            .await??;
            queue.poke();
            println!("removed {id} from the queue (its sender is not told)");
        }
        QueueCmd::Bounce { id } => {
            let q = queue.clone();
            let i = id.clone();
            let n = crate::blocking::run("bouncing a queue entry", move || {
                change(&q, &i, |e| {
                    let now = entry::now();
                    let null = e.sender.is_empty();
                    let mut n = 0;
                    for r in e
                        .recipients
                        .iter_mut()
                        .filter(|r| r.status == Status::Queued)
                    {
                        r.status = Status::Failed;
                        r.notified = null;
                        r.next_attempt = now;
                        r.last_error = Some("returned to the sender by the administrator".into());
                        r.last_status = Some("5.0.0".into());
                        r.diagnostic = None;
                        n += 1;
                    }
                    n
                })
            })
            .await??;
            queue.poke();
            println!("{id}: {n} recipient(s) will be returned to the sender");
        }
    }
    Ok(())
}

/// Locks an entry, lets `f` change its state, writes it back.
fn change<T>(q: &Queue, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Result<T, QueueError> {
    let lock = q.lock(id)?;
    let mut e = q.read_state(id)?;
    let out = f(&mut e);
    q.write_state(&lock, &e)?;
    Ok(out)
}

/// An entry for people: a line for the message, one per recipient.
fn human(v: &EntryView) -> String {
    let mut s = format!("{}\t{}\t{}\t<{}>", v.id, v.size, v.created, v.sender);
    for r in &v.recipients {
        s.push_str(&format!(
            "\n  {}\t{}\tattempts={}\tnext={}\t{}",
            r.address,
            r.status,
            r.attempts,
            r.next_attempt.as_deref().unwrap_or("-"),
            r.last_error.as_deref().unwrap_or("")
        ));
    }
    s
}
