//! Progress reporting for long commands (`-p`): a bar with rate and ETA on a terminal,
//! qemu-img's `    (NN.NN/100%)` lines otherwise, so scripts that parse them keep working.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Progress: a bar with rate and ETA on a terminal, qemu-img's `(NN.NN/100%)` otherwise.
pub struct Progress {
    enabled: bool,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: AtomicU64,
    last_pct: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn new(enabled: bool, total: u64) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        if enabled && bar.is_none() {
            print!("    (0.00/100%)\r");
        }
        Progress {
            enabled,
            bar,
            total,
            done: AtomicU64::new(0),
            last_pct: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn add(&self, n: u64) {
        if !self.enabled {
            return;
        }
        let done = self.done.fetch_add(n, Relaxed) + n;
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        // qemu-img prints when progress moved by at least 1%.
        let pct = done * 10000 / self.total.max(1);
        let last = self.last_pct.load(Relaxed);
        if pct >= last + 100 || done >= self.total {
            self.last_pct.store(pct, Relaxed);
            use std::io::Write;
            print!("    ({:.2}/100%)\r", pct as f64 / 100.0);
            let _ = std::io::stdout().flush();
        }
    }

    pub fn finish(&self) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(b) => b.finish_with_message(format!("done in {:.1?}", self.started.elapsed())),
            None => println!("    (100.00/100%)"),
        }
    }

    /// qemu-img compare's ending: the last percentage ends with `\r`, the result line follows,
    /// then [`Progress::end_after_message`] closes with an empty line.
    pub fn finish_before_message(&self) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None if self.last_pct.load(Relaxed) >= 10000 => {} // 100% already shown
            None => {
                use std::io::Write;
                print!("    (100.00/100%)\r");
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// Moves to `done` of `total` (work measured by the caller, not in `self.total` units).
    pub fn set_fraction(&self, done: u64, total: u64) {
        let target = done.min(total) * self.total / total.max(1);
        let now = self.done.load(Relaxed);
        if target > now {
            self.add(target - now);
        }
    }

    /// qemu-img amend's ending: 100% once more, whatever was printed before.
    pub fn finish_repeating_before_message(&self) {
        if self.enabled && self.bar.is_none() && self.last_pct.load(Relaxed) >= 10000 {
            use std::io::Write;
            print!("    (100.00/100%)\r");
            let _ = std::io::stdout().flush();
            return;
        }
        self.finish_before_message();
    }

    pub fn end_after_message(&self) {
        if self.enabled && self.bar.is_none() {
            println!();
        }
    }
}
