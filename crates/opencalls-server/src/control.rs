//! The control plane: apps, the registry, worker placement, and request/reply calls into
//! the media workers. Never blocks a media thread: commands are queued, replies awaited.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opencalls_sfu::{
    load, Certificate, Command, IngressPath, Peer, PeerConfig, Reply, WorkerHandle,
};

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
    /// Per mille: a worker whose load reads this or more takes no new session (1000: only
    /// one that never waited for input over the smoothed window).
    max_load_permille: u32,
    /// `sessions/new` requests refused because no worker had room (saturated or at its
    /// load limit).
    pub refused_sessions: AtomicU64,
}

impl Control {
    /// Builds the control plane over running workers; its peers receive RTP on `ingress`.
    pub fn new(
        apps: AppStore,
        workers: Vec<WorkerHandle>,
        certificate: Certificate,
        ingress: IngressPath,
        max_worker_load: f64,
    ) -> Control {
        Control {
            apps,
            registry: Mutex::new(Registry::default()),
            workers,
            certificate,
            ingress,
            next_worker: AtomicUsize::new(0),
            max_load_permille: (max_worker_load.clamp(0.0, 1.0) * f64::from(load::FULL)).round()
                as u32,
            refused_sessions: AtomicU64::new(0),
        }
    }

    /// The registry (held for microseconds; never across an await).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock would be a bug in plain map code; keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker for a new session: of those that keep up with their sockets and are
    /// under the load limit, the one with the fewest sessions (ties broken round-robin).
    /// 503 when there is none: a session placed on a worker whose socket queue overflows
    /// would drown its own handshake there and take a share of a core its sessions
    /// already lack.
    pub fn place(&self) -> Result<&WorkerHandle, ApiError> {
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let loads: Vec<Load> = self
            .workers
            .iter()
            .map(|w| {
                let s = w.stats();
                Load {
                    saturated: s.saturated.load(Ordering::Relaxed),
                    permille: s.load_permille.load(Ordering::Relaxed),
                    sessions: s.sessions.load(Ordering::Relaxed),
                }
            })
            .collect();
        match choose_worker(&loads, self.max_load_permille, start) {
            Some(i) => Ok(&self.workers[i]),
            None => {
                self.refused_sessions.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::overloaded())
            }
        }
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

/// What placement knows of a worker.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// The kernel dropped datagrams at its sockets within the last second or so.
    saturated: bool,
    /// Busy share of its wall time, per mille.
    permille: u32,
    sessions: usize,
}

/// The index of the worker with the fewest sessions among those not saturated and under
/// `max_load` (per mille), looking from `start` round-robin so that ties spread; `None`
/// when there is none.
fn choose_worker(loads: &[Load], max_load: u32, start: usize) -> Option<usize> {
    let n = loads.len();
    (0..n)
        .map(|i| (start + i) % n)
        .filter(|&i| !loads[i].saturated && loads[i].permille < max_load)
        .min_by_key(|&i| loads[i].sessions)
}

#[cfg(test)]
mod tests {
    use super::{choose_worker, Load};

    fn w(permille: u32, sessions: usize) -> Load {
        Load {
            saturated: false,
            permille,
            sessions,
        }
    }

    #[test]
    fn the_fewest_sessions_win_among_workers_under_the_limit() {
        let loads = [w(100, 5), w(990, 1), w(300, 3)];
        assert_eq!(choose_worker(&loads, 950, 0), Some(2));
        assert_eq!(choose_worker(&loads, 1000, 0), Some(1));
    }

    #[test]
    fn a_saturated_worker_takes_no_session_whatever_its_load() {
        let saturated = Load {
            saturated: true,
            ..w(100, 0)
        };
        assert_eq!(choose_worker(&[saturated, w(500, 9)], 1000, 0), Some(1));
        assert_eq!(choose_worker(&[saturated], 1000, 0), None);
    }

    #[test]
    fn ties_spread_round_robin() {
        let loads = [w(0, 2), w(0, 2), w(0, 2)];
        let picked: Vec<_> = (0..3)
            .map(|s| choose_worker(&loads, 950, s).unwrap())
            .collect();
        assert_eq!(picked, vec![0, 1, 2]);
    }

    #[test]
    fn no_worker_when_all_are_at_the_limit() {
        assert_eq!(choose_worker(&[w(950, 0), w(1000, 0)], 950, 0), None);
        assert_eq!(choose_worker(&[w(0, 0)], 0, 0), None);
        assert_eq!(choose_worker(&[w(999, 0)], 1000, 0), Some(0));
    }
}
