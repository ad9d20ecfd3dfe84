//! The disk's ceiling for durable maildir delivery, with no SMTP: the
//! filesystem work of one letterbox copy (create in `tmp/`, write,
//! fdatasync, link into `new/`, unlink from `tmp/`, fsync `new/`) done by
//! `--writers` threads at once, each into a mailbox of its own, until
//! `--copies` copies are in `new/`. bench/harness.py runs it beside the
//! servers so that each run's figures can be read against what the disk
//! itself allowed at that moment.
//!
//!   fsync_ceiling --root DIR --writers N --copies TOTAL --size BYTES
//!
//! Prints the seconds from the first create to the last fsync. Mailboxes
//! are `DIR/bench.test/<writer>/`, created before the clock starts.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

struct Args {
    root: PathBuf,
    writers: usize,
    copies: usize,
    size: usize,
}

fn parse() -> Result<Args, String> {
    let mut root = None;
    let (mut writers, mut copies, mut size) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(&value)),
            "--writers" => writers = Some(number()?),
            "--copies" => copies = Some(number()?),
            "--size" => size = Some(number()?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let args = Args {
        root: root.ok_or("--root is required")?,
        writers: writers.ok_or("--writers is required")?,
        copies: copies.ok_or("--copies is required")?,
        size: size.ok_or("--size is required")?,
    };
    if args.writers == 0 || !args.copies.is_multiple_of(args.writers) {
        return Err("--copies must be a multiple of a non-zero --writers".into());
    }
    Ok(args)
}

/// One copy, in the order letterbox's delivery makes it durable.
fn deliver(mailbox: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = mailbox.join("tmp").join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_data()?;
    let new = mailbox.join("new");
    fs::hard_link(&tmp, new.join(name))?;
    fs::remove_file(&tmp)?;
    File::open(&new)?.sync_all()
}

fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("fsync_ceiling: {e}");
        std::process::exit(2);
    });
    let per_writer = args.copies / args.writers;
    let mailboxes: Vec<PathBuf> = (0..args.writers)
        .map(|w| args.root.join("bench.test").join(w.to_string()))
        .collect();
    for m in &mailboxes {
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(m.join(sub)).expect("create mailbox");
        }
    }
    let data: Arc<[u8]> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect();
    // Every writer starts at once, so the clock covers only parallel work.
    let start = Arc::new(Barrier::new(args.writers + 1));
    let threads: Vec<_> = mailboxes
        .into_iter()
        .map(|mailbox| {
            let (start, data) = (start.clone(), data.clone());
            std::thread::spawn(move || {
                start.wait();
                for n in 0..per_writer {
                    deliver(&mailbox, &format!("{}.{n}", std::process::id()), &data)
                        .unwrap_or_else(|e| panic!("{}: {e}", mailbox.display()));
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for t in threads {
        if t.join().is_err() {
            std::process::exit(1);
        }
    }
    println!("{:.6}", t0.elapsed().as_secs_f64());
}
