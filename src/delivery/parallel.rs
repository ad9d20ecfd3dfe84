//! Runs the fsyncs of one transaction side by side. A message for five
//! mailboxes is five files and five `new/` directories to make durable;
//! one after another that is ten device flushes in a row, while issued
//! together they can overlap (the block layer merges flushes that are in
//! flight at once). How much that gains depends on the device: on the
//! benchmark's virtio disk, 1 session with 5 recipients went about 20 %
//! faster (bench/analysis.md).
//!
//! The threads are few, made on first use and kept: never one per message.
//! They run only leaf tasks (a single fsync), which never wait for other
//! tasks, so however busy they are every task is eventually run: a full
//! pool delays a transaction, it cannot deadlock it. The caller runs one
//! task itself, so a single-copy transaction never leaves its thread.
//!
//! A task that panics is reported as [`Panicked`] in its slot: the
//! delivery then fails (451) instead of waiting for a result that never
//! comes, and the pool thread lives on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// A task panicked instead of returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

/// Threads in the pool: enough for the recipients of a few concurrent
/// transactions to sync at once, few enough to cost nothing when idle.
const THREADS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

/// A small pool for blocking tasks that must run concurrently.
#[derive(Debug, Default)]
pub(crate) struct Parallel {
    /// Made on first use; the threads end when this is dropped.
    jobs: OnceLock<Mutex<Sender<Job>>>,
}

impl Parallel {
    /// Runs every task, the first on this thread and the others on the
    /// pool, and returns their results in order. Blocking.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        mut tasks: Vec<Box<dyn FnOnce() -> T + Send>>,
    ) -> Vec<Result<T, Panicked>> {
        let guarded = |task: Box<dyn FnOnce() -> T + Send>| {
            catch_unwind(AssertUnwindSafe(task)).map_err(|_| {
                tracing::error!("a delivery task panicked; the delivery fails");
                Panicked
            })
        };
        if tasks.len() <= 1 {
            return tasks.into_iter().map(guarded).collect();
        }
        let first = tasks.remove(0);
        let (done, results) = mpsc::channel();
        let n = tasks.len();
        {
            let jobs = self.jobs().lock().unwrap();
            for (i, task) in tasks.into_iter().enumerate() {
                let done = done.clone();
                let job: Job = Box::new(move || {
                    let _ = done.send((i, guarded(task)));
                });
                jobs.send(job)
                    .expect("the pool lives as long as its sender");
            }
        }
        let mut out: Vec<Option<Result<T, Panicked>>> = (0..=n).map(|_| None).collect();
        out[0] = Some(guarded(first));
        for _ in 0..n {
            let (i, r) = results.recv().expect("every job reports");
            out[i + 1] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every slot filled"))
            .collect()
    }

    fn jobs(&self) -> &Mutex<Sender<Job>> {
        self.jobs.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..THREADS {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("letterbox-sync-{i}"))
                    .spawn(move || worker(&rx))
                    .expect("spawn a delivery sync thread");
            }
            Mutex::new(tx)
        })
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only to take one job, never while it runs.
        let job = rx.lock().unwrap().recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn results_come_back_in_order() {
        let p = Parallel::default();
        let tasks: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..20usize)
            .map(|i| Box::new(move || i * 10) as Box<dyn FnOnce() -> usize + Send>)
            .collect();
        assert_eq!(
            p.run(tasks),
            (0..20usize).map(|i| Ok(i * 10)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tasks_run_at_the_same_time() {
        // Four tasks that each wait for all four: only concurrent ones finish.
        let p = Parallel::default();
        let barrier = Arc::new(Barrier::new(4));
        let tasks: Vec<Box<dyn FnOnce() -> bool + Send>> = (0..4)
            .map(|_| {
                let b = barrier.clone();
                Box::new(move || {
                    b.wait();
                    true
                }) as Box<dyn FnOnce() -> bool + Send>
            })
            .collect();
        assert_eq!(p.run(tasks), vec![Ok(true); 4]);
    }

    #[test]
    fn a_single_task_runs_on_the_callers_thread() {
        let p = Parallel::default();
        let me = std::thread::current().id();
        let tasks: Vec<Box<dyn FnOnce() -> bool + Send>> =
            vec![Box::new(move || std::thread::current().id() == me)];
        assert_eq!(p.run(tasks), vec![Ok(true)]);
        assert!(p.jobs.get().is_none(), "no pool for a single task");
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_lives_on() {
        let p = Parallel::default();
        let tasks: Vec<Box<dyn FnOnce() -> u8 + Send>> = vec![
            Box::new(|| 1),
            Box::new(|| panic!("a sync failed badly")),
            Box::new(|| 3),
        ];
        assert_eq!(p.run(tasks), vec![Ok(1), Err(Panicked), Ok(3)]);
        // Every pool thread still serves: more tasks than the first call
        // could have left alive if a panic killed its thread.
        let tasks: Vec<Box<dyn FnOnce() -> u8 + Send>> = (0..THREADS as u8 * 2)
            .map(|i| Box::new(move || i) as Box<dyn FnOnce() -> u8 + Send>)
            .collect();
        assert_eq!(p.run(tasks).len(), THREADS * 2);
        let first: Vec<Box<dyn FnOnce() -> u8 + Send>> = vec![Box::new(|| panic!("on the caller"))];
        assert_eq!(p.run(first), vec![Err(Panicked)]);
    }
}
