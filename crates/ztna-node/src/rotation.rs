//! Moving a client's connection to a reloaded certificate: renewed in place, or else make before
//! break.
//!
//! A connector or agent supervises one connection per intermediate. When a reload brings a
//! different certificate ([`crate::client::ClientTls::rotations`]) for the same identity, the
//! serving connection is renewed in place ([`crate::renew`]) where the intermediate can do
//! that. Otherwise (an older intermediate, a new identity, a refused renewal), the supervisor
//! makes a *candidate* connection with it while the *serving* one goes on. Once the candidate is ready
//! (registered, or up), the serving one retires: it stops taking new work and closes when its
//! running flows end. If the candidate fails first, the serving one simply keeps serving and
//! the supervisor tries again after its backoff.

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::renew::{InPlace, Need};

use crate::CancellationToken;

/// How long a retiring connection waits before it counts its flows: one chosen just before the
/// candidate took over is still opening on it.
pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The flows using one connection (each holds a guard that calls [`Users::add`] and, when
/// dropped, [`Users::remove`]), so that a retiring connection knows when its last one ended.
pub struct Users(tokio::sync::watch::Sender<usize>);

impl Default for Users {
    fn default() -> Users {
        Users(tokio::sync::watch::channel(0).0)
    }
}

impl Users {
    pub fn add(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    pub fn remove(&self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Returns once the connection is retired ([`Running::retire`]), [`RETIRE_GRACE`] has
    /// passed, and no flow uses it: then it may close.
    pub async fn retired_and_unused(&self, retire: &CancellationToken) {
        retire.cancelled().await;
        tokio::time::sleep(RETIRE_GRACE).await;
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One connection's task, as its supervisor holds it.
pub struct Running<E> {
    pub task: JoinHandle<E>,
    /// Cancelled to retire the connection (see the module docs).
    pub retire: CancellationToken,
    /// Cancelled by the task once the connection can take over.
    pub ready: CancellationToken,
    /// Whether the connection can be renewed in place, shared with its session.
    pub in_place: Arc<InPlace>,
}

impl<E: Send + 'static> Running<E> {
    /// Spawns `task(retire, ready)` for a connection whose session shares `in_place`.
    pub fn spawn<F>(
        in_place: Arc<InPlace>,
        task: impl FnOnce(CancellationToken, CancellationToken) -> F,
    ) -> Running<E>
    where
        F: std::future::Future<Output = E> + Send + 'static,
    {
        let (retire, ready) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(task(retire.clone(), ready.clone()));
        Running {
            task,
            retire,
            ready,
            in_place,
        }
    }

    /// Retires it; the task runs on, detached, until its last flow ends.
    pub fn retire(self) {
        self.retire.cancel();
    }
}

/// Waits for the task in `slot` to end (never, for an empty slot); the slot is then empty.
pub async fn ended<E: Default>(slot: &mut Option<Running<E>>) -> E {
    let out = match slot {
        Some(r) => (&mut r.task).await.unwrap_or_default(),
        None => std::future::pending().await,
    };
    *slot = None;
    out
}

/// Waits until the task in `slot` is ready (never, for an empty slot).
pub fn ready<E>(slot: &Option<Running<E>>) -> impl std::future::Future<Output = ()> {
    let token = slot.as_ref().map(|r| r.ready.clone());
    async move {
        match token {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    }
}

/// When an attempt of a supervisor whose serving connection is in `serving` (none: it is
/// reconnecting) comes due, `current` being the certificate in use: `Ok` to connect now, or
/// `Err(next)`, no connection now and the next attempt at `next` (none: none is needed, as the
/// serving connection holds `current` or is being renewed to it in place, see
/// [`crate::renew::InPlace`]).
pub fn connection_needed<E>(
    serving: &Option<Running<E>>,
    current: &crate::Identity,
) -> Result<(), Option<tokio::time::Instant>> {
    let Some(r) = serving else {
        return Ok(());
    };
    match r.in_place.connection_needed(current) {
        Need::No => Err(None),
        Need::Later(d) => Err(Some(tokio::time::Instant::now() + d)),
        Need::Now => {
            tracing::info!("certificate replaced: connecting with the new one; flows running on the old connection finish there");
            Ok(())
        }
    }
}

/// Returns when a renewal of the connection in `slot` is refused (never, for an empty slot).
pub fn renewal_refused<E>(slot: &Option<Running<E>>) -> impl std::future::Future<Output = ()> {
    let in_place = slot.as_ref().map(|r| r.in_place.clone());
    async move {
        match in_place {
            Some(p) => p.refused().await,
            None => std::future::pending().await,
        }
    }
}

/// Waits for the next certificate rotation (never, once the sender is gone).
pub async fn rotated(rotations: &mut tokio::sync::watch::Receiver<u64>) {
    if rotations.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn in_place() -> Arc<InPlace> {
        InPlace::new(crate::SpiffeId::parse("spiffe://test.example/agent/a").unwrap())
    }

    #[tokio::test]
    async fn a_slot_ends_with_its_task_and_an_empty_one_never() {
        let mut slot = Some(Running::spawn(in_place(), |_, ready| async move {
            ready.cancel();
            7u32
        }));
        tokio::time::timeout(Duration::from_secs(1), ready(&slot))
            .await
            .expect("ready");
        let got = tokio::time::timeout(Duration::from_secs(1), ended(&mut slot)).await;
        assert_eq!(got.ok(), Some(7));
        assert!(slot.is_none());
        let never = tokio::time::timeout(Duration::from_millis(50), ended::<u32>(&mut slot)).await;
        assert!(never.is_err(), "an empty slot ended");
    }

    #[tokio::test]
    async fn a_retired_connection_is_unused_only_after_its_grace_and_last_flow() {
        let users = std::sync::Arc::new(Users::default());
        let retire = CancellationToken::new();
        users.add();
        let done = tokio::spawn({
            let (users, retire) = (users.clone(), retire.clone());
            async move { users.retired_and_unused(&retire).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!done.is_finished(), "unused before it was retired");
        retire.cancel();
        tokio::time::sleep(RETIRE_GRACE + Duration::from_millis(300)).await;
        assert!(!done.is_finished(), "unused while a flow still used it");
        users.remove();
        tokio::time::timeout(Duration::from_secs(1), done)
            .await
            .expect("not unused after its last flow")
            .unwrap();
    }

    #[tokio::test]
    async fn a_retired_task_is_told_and_runs_on() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let r = Running::spawn(in_place(), |retire, _| async move {
            retire.cancelled().await;
            let _ = tx.send("retired");
        });
        r.retire();
        let got = tokio::time::timeout(Duration::from_secs(1), rx).await;
        assert_eq!(got.ok().and_then(|r| r.ok()), Some("retired"));
    }
}
