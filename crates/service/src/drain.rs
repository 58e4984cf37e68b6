//! Stopping a service without cutting calls short, and without waiting for idle clients.
//!
//! A gRPC server told to stop waits for its connections to close, and a client that keeps
//! an idle connection open (as gRPC channels do) holds it for the whole grace period
//! (hyper#4170). Services therefore count the calls they are serving ([`InFlight`]) and
//! stop once none is left, whatever idle connections remain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Calls being served right now. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    inner: Arc<Counter>,
}

#[derive(Debug, Default)]
struct Counter {
    calls: AtomicUsize,
    idle: Notify,
}

/// Held for as long as a call is served (for a stream, as long as the stream lives).
#[derive(Debug)]
pub struct CallGuard {
    inner: Arc<Counter>,
}

impl InFlight {
    /// Counts a call until the guard is dropped.
    pub fn enter(&self) -> CallGuard {
        self.inner.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard {
            inner: self.inner.clone(),
        }
    }

    /// Calls being served now.
    pub fn count(&self) -> usize {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// Resolves once no call is being served.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.inner.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_guard() {
        let in_flight = InFlight::default();
        in_flight.idle().await;
        let first = in_flight.enter();
        let second = in_flight.enter();
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one call is still in flight");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
