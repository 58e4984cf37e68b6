//! The coordinator's own tasks (the scheduler, the site monitor, one per site session),
//! owned in one place: each has a name, a panic in one is logged with it instead of
//! vanishing, and shutdown waits for all of them.

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use tokio_util::task::TaskTracker;

/// The owner of the coordinator's background tasks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
}

impl Tasks {
    /// A new, empty owner.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `task`, known as `name` in logs.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(async move {
            if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                tracing::error!(task = name, "coordinator task panicked");
            }
        });
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// True when none runs.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Takes no more tasks and waits for those running to end (the caller has told them
    /// to stop).
    pub async fn close_and_wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
