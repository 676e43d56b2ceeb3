//! The control plane: apps, the registry, worker placement, and request/reply calls into
//! the media workers. Never blocks a media thread: commands are queued, replies awaited.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opencalls_sfu::{Certificate, Command, IngressPath, Peer, PeerConfig, Reply, WorkerHandle};

use crate::apps::AppStore;
use crate::http::ApiError;
use crate::registry::Registry;

/// How long a media worker may take to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the HTTP handlers.
pub struct Control {
    /// Accepted apps.
    pub apps: AppStore,
    registry: Mutex<Registry>,
    workers: Vec<WorkerHandle>,
    certificate: Certificate,
    ingress: IngressPath,
    next_worker: AtomicUsize,
}

impl Control {
    /// Builds the control plane over running workers; its peers receive RTP on `ingress`.
    pub fn new(
        apps: AppStore,
        workers: Vec<WorkerHandle>,
        certificate: Certificate,
        ingress: IngressPath,
    ) -> Control {
        Control {
            apps,
            registry: Mutex::new(Registry::default()),
            workers,
            certificate,
            ingress,
            next_worker: AtomicUsize::new(0),
        }
    }

    /// The registry (held for microseconds; never across an await).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock would be a bug in plain map code; keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Worker with the fewest sessions (ties broken round-robin).
    pub fn place(&self) -> &WorkerHandle {
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let n = self.workers.len();
        (0..n)
            .map(|i| &self.workers[(start + i) % n])
            .min_by_key(|w| w.stats().sessions.load(Ordering::Relaxed))
            .expect("invariant: at least one worker")
    }

    /// Worker by index.
    pub fn worker(&self, index: usize) -> &WorkerHandle {
        &self.workers[index]
    }

    /// Every worker.
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// Builds a peer for `worker`.
    pub fn build_peer(&self, worker: &WorkerHandle) -> Result<Peer, ApiError> {
        let config = PeerConfig {
            certificate: self.certificate.clone(),
            candidates: worker.candidates().to_vec(),
            ingress: self.ingress,
        };
        // ~50 µs (peer.rs builds the DTLS config once per process): cheaper inline than a
        // hand-off to the blocking pool and back.
        Peer::new(&config, Instant::now()).map_err(|_| ApiError::internal())
    }

    /// Sends a command to a worker and waits for its reply.
    pub async fn call<T: Send + 'static>(
        &self,
        worker: usize,
        build: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply: Reply<T> = Box::new(move |v| {
            let _ = tx.send(v);
        });
        if !self.workers[worker].send(build(reply)) {
            return Err(ApiError::unavailable());
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(ApiError::unavailable()),
        }
    }
}

/// Applies media-plane events to the registry until the channel closes.
pub fn spawn_event_loop(
    control: Arc<Control>,
    events: crossbeam_channel::Receiver<opencalls_sfu::MediaEvent>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("media-events".into())
        .spawn(move || {
            for ev in events {
                let mut reg = control.registry();
                match ev {
                    opencalls_sfu::MediaEvent::SessionClosed { key, reason } => {
                        tracing::debug!(session = key.0, ?reason, "session closed");
                        reg.session_closed(key, reason, std::time::Instant::now());
                    }
                    opencalls_sfu::MediaEvent::PublicationClosed { key, track_name } => {
                        reg.publication_closed(key, &track_name);
                    }
                }
            }
        })
        .expect("spawning the event thread")
}
