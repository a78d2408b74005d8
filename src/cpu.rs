//! CPU-bound work (compression) off the async executor.
//!
//! A fixed set of threads, one per core, takes jobs from one FIFO queue and hands each result
//! back through a oneshot channel. Why not `spawn_blocking` behind a semaphore: there, a finished
//! job keeps its permit until its async task has been polled again on a (possibly busy) executor
//! thread, and the next job starts only after another task was polled and a blocking thread woke
//! up: three hops during which the core sits idle. Here a thread that finishes a job takes the
//! next one from the queue at once, so both cores stay busy as long as work is queued.
//!
//! FIFO keeps results roughly in submission order, which is the order compressed clusters are
//! laid out in (see `qcow2::compress`): early jobs do not wait behind later ones. The queue holds
//! only what callers submitted and still await (each caller bounds its own requests in flight),
//! so it needs no limit of its own. A job whose caller went away still runs; its result is
//! dropped.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Threads that started; with none (the system refused them all) jobs run inline.
    threads: usize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let wanted = std::thread::available_parallelism().map_or(2, |n| n.get());
        // The threads wait in `pool()` until this initialization has finished.
        let threads = (0..wanted)
            .filter(|i| {
                std::thread::Builder::new()
                    .name(format!("qimg-cpu-{i}"))
                    .spawn(work)
                    .is_ok()
            })
            .count();
        Pool {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            threads,
        }
    })
}

fn work() {
    let p = pool();
    loop {
        let job = {
            let mut q = p.queue.lock();
            loop {
                if let Some(j) = q.pop_front() {
                    break j;
                }
                p.ready.wait(&mut q);
            }
        };
        job();
    }
}

/// Runs `f` on a CPU thread; resolves to its result.
///
/// A panic in `f` is caught and reported as `None` (the thread lives on).
pub fn run<T, F>(f: F) -> impl std::future::Future<Output = Option<T>> + Send
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Sending (and dropping the result when the caller went away) inside the catch too: no
    // panic may end a pool thread.
    let job: Job = Box::new(move || {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _ = tx.send(f());
        }));
    });
    let p = pool();
    if p.threads == 0 {
        job();
    } else {
        p.queue.lock().push_back(job);
        p.ready.notify_one();
    }
    async move { rx.await.ok() }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs_jobs_and_reports_panics() {
        let jobs: Vec<_> = (0..64u64).map(|i| super::run(move || i * i)).collect();
        let got = futures_util::future::join_all(jobs).await;
        let want: Vec<_> = (0..64u64).map(|i| Some(i * i)).collect();
        assert_eq!(got, want);
        let panicked = super::run(|| -> u32 { panic!("job panics") }).await;
        assert_eq!(panicked, None);
        // The pool still works after a panic.
        assert_eq!(super::run(|| 7).await, Some(7));
    }
}
