//! Precise waits for the sandbox's provider latency.
//!
//! tokio's timer rounds every sleep up to its next millisecond tick, and
//! the runtime wakes from its own park a little later still: a "50 ms
//! provider" answered 1.2–2 ms late, which put the sandbox's own error into
//! every latency-bound benchmark figure. One thread of our own keeps every
//! waiting request's deadline and sleeps until the earliest (a futex wait
//! with a timeout, accurate to tens of microseconds), then wakes the
//! requests that are due. One thread for all requests: a blocking-pool
//! thread per request would be hundreds of threads at prefetch 256.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::oneshot;

/// A request's deadline and whom to wake then.
struct Waiter {
    deadline: Instant,
    /// Breaks ties so the heap never compares senders.
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// What a waiting request sends the clock thread.
type Wait = (Instant, oneshot::Sender<()>);

/// The clock thread's inbox, started on first use and kept for the
/// process (the sandbox runs in tests, demos and benchmarks only).
fn inbox() -> Option<&'static mpsc::Sender<Wait>> {
    static INBOX: OnceLock<Option<mpsc::Sender<Wait>>> = OnceLock::new();
    INBOX
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("sandbox-clock".into())
                .spawn(move || run(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Waits until `deadline`. Falls back to tokio's timer when the clock
/// thread could not be started.
pub(super) async fn sleep_until(deadline: Instant) {
    let (wake, woken) = oneshot::channel();
    match inbox() {
        Some(inbox) if inbox.send((deadline, wake)).is_ok() => {
            let _ = woken.await;
        }
        _ => tokio::time::sleep_until(deadline.into()).await,
    }
}

/// The clock thread: sleep until the earliest deadline or a new waiter,
/// then wake everyone due.
fn run(inbox: mpsc::Receiver<Wait>) {
    let mut waiting: BinaryHeap<Reverse<Waiter>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = match waiting.peek() {
            None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(Reverse(first)) => {
                let now = Instant::now();
                if first.deadline <= now {
                    Err(RecvTimeoutError::Timeout)
                } else {
                    inbox.recv_timeout(first.deadline - now)
                }
            }
        };
        match next {
            Ok((deadline, wake)) => {
                seq += 1;
                waiting.push(Reverse(Waiter {
                    deadline,
                    seq,
                    wake,
                }));
            }
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                while waiting.peek().is_some_and(|Reverse(w)| w.deadline <= now) {
                    if let Some(Reverse(due)) = waiting.pop() {
                        // The request may have gone (client hung up).
                        let _ = due.wake.send(());
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_each_waiter_at_its_deadline_in_order() {
        let start = Instant::now();
        let late = tokio::spawn(sleep_until(start + Duration::from_millis(30)));
        let early = tokio::spawn(sleep_until(start + Duration::from_millis(10)));
        early.await.expect("early");
        let early_at = start.elapsed();
        assert!(early_at >= Duration::from_millis(10), "{early_at:?}");
        assert!(!late.is_finished(), "the later deadline fired early");
        late.await.expect("late");
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
