//! The worker thread pool that runs blocking file I/O.
//!
//! One pool serves every open file, like QEMU's AIO thread pool. Threads are started on demand
//! (when a job arrives and none is idle) up to a cap, and then stay. A job owns everything it
//! touches (file handle, buffer), so a dropped request future cannot leave a thread writing into
//! freed memory: the result is simply discarded.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

struct State {
    queue: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    max_threads: usize,
}

/// A pool of I/O worker threads.
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    fn new(max_threads: usize) -> Self {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                }),
                wake: Condvar::new(),
                max_threads,
            }),
        }
    }

    /// The process-wide pool (64 threads at most, as QEMU's).
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(64))
    }

    /// Runs `f` on a worker thread and resolves to its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.submit(job)?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("I/O worker thread lost the request")))
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        let spawn = {
            let mut st = self.shared.state.lock();
            st.queue.push_back(job);
            if st.idle == 0 && st.threads < self.shared.max_threads {
                st.threads += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name("qimg-io".into())
                .spawn(move || worker(shared));
            if let Err(e) = started {
                let mut st = self.shared.state.lock();
                st.threads -= 1;
                if st.threads == 0 {
                    st.queue.clear();
                    return Err(e);
                }
            }
        } else {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

fn worker(shared: Arc<Shared>) {
    let mut st = shared.state.lock();
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            job();
            st = shared.state.lock();
            continue;
        }
        st.idle += 1;
        shared.wake.wait(&mut st);
        st.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_many_jobs_concurrently() {
        let pool = Pool::new(8);
        let futs = (0..100u64).map(|i| {
            let pool = &pool;
            async move { pool.run(move || Ok(i * 2)).await.unwrap() }
        });
        let results = futures_util::future::join_all(futs).await;
        assert_eq!(results.iter().sum::<u64>(), 9900);
    }

    #[tokio::test]
    async fn dropped_future_does_not_break_the_pool() {
        let pool = Pool::new(2);
        let fut = pool.run(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(1)
        });
        drop(fut); // never polled: never submitted
        let f2 = pool.run(|| Ok(2));
        assert_eq!(f2.await.unwrap(), 2);
    }
}
