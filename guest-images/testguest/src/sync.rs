//! Coordination between vCPUs through shared memory: lock-prefixed atomics run natively in guest
//! user mode, so a spinning barrier is the cheapest rendezvous there is (interrupts are off).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A sense-reversing spin barrier for a fixed number of participants.
pub struct SpinBarrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Default for SpinBarrier {
    fn default() -> Self {
        Self::new()
    }
}

impl SpinBarrier {
    pub const fn new() -> Self {
        SpinBarrier {
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Waits until `n` participants have called `wait` for this generation.
    pub fn wait(&self, n: u32) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation
                .store(gen.wrapping_add(1), Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == gen {
                core::hint::spin_loop();
            }
        }
    }
}

/// `min` on an atomic (no `fetch_min` needed from callers that only have a shared reference).
pub fn atomic_min(a: &AtomicU64, v: u64) {
    a.fetch_min(v, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn barrier_separates_phases() {
        let b = Arc::new(SpinBarrier::new());
        let count = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, count) = (b.clone(), count.clone());
                std::thread::spawn(move || {
                    for round in 1..=50 {
                        count.fetch_add(1, Ordering::SeqCst);
                        b.wait(4);
                        assert_eq!(count.load(Ordering::SeqCst), 4 * round);
                        b.wait(4);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
