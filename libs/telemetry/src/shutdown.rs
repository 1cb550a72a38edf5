//! Graceful shutdown: SIGINT or SIGTERM (what Kubernetes sends before it kills a pod)
//! makes a server stop accepting; the calls in flight get a drain period to finish, and
//! the process then exits 0.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// How long calls in flight may run on after a shutdown signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct DrainArgs {
    /// Seconds that calls in flight (streams, blocks) may run on after SIGTERM or SIGINT
    /// before they are cut; keep it below the orchestrator's grace period.
    #[arg(long = "drain-secs", env = "BD3LM_DRAIN_SECS", default_value = "20",
          value_parser = crate::cli::positive_secs)]
    pub drain: Duration,
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Calls `reload` on every SIGHUP (the usual signal to re-read credentials), from a task
/// that lives as long as the runtime.
pub fn on_hangup(reload: impl Fn() + Send + 'static) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be watched; reloading needs a restart");
            return;
        };
        while hangups.recv().await.is_some() {
            reload();
        }
    });
}

/// The future a server is handed: it resolves when the server is to stop accepting.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server `serve` builds around its [`Stop`] until it returns (its calls in
/// flight done), or until `drain` after `signal` fired, whichever comes first.
pub async fn drained<E, S>(
    signal: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    serve: impl FnOnce(Stop) -> S,
) -> Result<(), E>
where
    S: Future<Output = Result<(), E>>,
{
    let (fired, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        tracing::info!(
            drain_secs = drain.as_secs_f64(),
            "shutting down: no new calls; those in flight may finish"
        );
        let _ = fired.send(true);
    });
    let stop = {
        let mut watch = watch.clone();
        Box::pin(async move {
            let _ = watch.wait_for(|&f| f).await;
        })
    };
    let deadline = async move {
        let mut watch = watch;
        if watch.wait_for(|&f| f).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        served = serve(stop) => served,
        _ = deadline => {
            tracing::warn!("drain period over: calls still in flight are cut");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that stops when asked returns at once; one whose calls run on is cut at
    /// the end of the drain period; without a signal neither stops.
    #[tokio::test]
    async fn servers_stop_when_asked_or_at_the_drain_deadline() {
        let drain = Duration::from_millis(50);
        let quick: Result<(), ()> = drained(async {}, Duration::from_secs(3600), |stop| async {
            stop.await;
            Ok(())
        })
        .await;
        assert!(quick.is_ok());
        let started = tokio::time::Instant::now();
        let stuck: Result<(), ()> = drained(async {}, drain, |stop| async {
            stop.await;
            std::future::pending().await
        })
        .await;
        assert!(stuck.is_ok() && started.elapsed() >= drain);
        let never = drained(std::future::pending(), drain, |_| async {
            std::future::pending::<Result<(), ()>>().await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), never)
                .await
                .is_err()
        );
    }
}
