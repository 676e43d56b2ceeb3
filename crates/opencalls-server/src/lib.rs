//! The opencalls server: configuration, the Calls HTTP API (control plane) and the media
//! workers, wired together. `main.rs` only parses the command line and calls [`start`].

pub mod apps;
pub mod config;
pub mod control;
pub mod demo;
pub mod http;
pub mod registry;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use opencalls_sfu::{Certificate, Endpoint, MediaConfig, MediaPlane, Timeouts};

use crate::apps::AppStore;
use crate::config::ServeConfig;
use crate::control::Control;

/// A running server.
pub struct Server {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// The accepted apps.
    pub apps: AppStore,
    /// The media workers' candidate addresses, by worker.
    pub media_addrs: Vec<Vec<SocketAddr>>,
    control: Arc<Control>,
    plane: Option<MediaPlane>,
    http: tokio::task::JoinHandle<()>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// The API base URL (`…/v1`) for clients on this host.
    pub fn api_base_url(&self) -> String {
        format!("{}/v1", self.origin())
    }

    /// Where a browser on this host opens the demo (a loopback name when bound to all
    /// interfaces, since browsers allow cameras only on secure or local origins).
    pub fn origin(&self) -> String {
        let mut addr = self.http_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::from([127, 0, 0, 1]));
        }
        if addr.ip().is_loopback() {
            format!("http://localhost:{}", addr.port())
        } else {
            format!("http://{addr}")
        }
    }

    /// Shared control-plane state (tests look at worker counters through it).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Stops accepting requests, closes every session and joins the workers.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.http).await;
        if let Some(plane) = self.plane.take() {
            let _ = tokio::task::spawn_blocking(move || plane.shutdown()).await;
        }
    }
}

/// Media endpoints for the configured bind address.
fn endpoints(config: &ServeConfig) -> Vec<Endpoint> {
    let bind = config.udp;
    if !bind.ip().is_unspecified() {
        return vec![Endpoint {
            bind,
            advertise: config.public_ip.unwrap_or(bind.ip()),
        }];
    }
    if let Some(ip) = config.public_ip {
        return vec![Endpoint {
            bind,
            advertise: ip,
        }];
    }
    // One socket per local IPv4 address, so every packet's destination is known exactly.
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|v| {
            v.into_iter()
                .map(|i| i.ip())
                .filter(IpAddr::is_ipv4)
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    ips.into_iter()
        .map(|ip| Endpoint {
            bind: SocketAddr::new(ip, bind.port()),
            advertise: ip,
        })
        .collect()
}

/// Starts the media workers and the HTTP API.
pub async fn start(config: ServeConfig) -> anyhow::Result<Server> {
    let apps = if config.apps.is_empty() {
        AppStore::load_or_create(&config.data_dir())?
    } else {
        AppStore::from_specs(&config.apps)?
    };
    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let idle = Duration::from_secs(config.idle_timeout_secs);
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let plane = MediaPlane::start(
        MediaConfig {
            workers,
            endpoints: endpoints(&config),
            timeouts: Timeouts {
                unconnected: idle,
                disconnected: idle,
                track_idle: idle,
            },
            aes_gcm: config.aes_gcm.into(),
        },
        events_tx,
    )?;
    let certificate = Certificate::generate()?;
    let handles = plane.workers().to_vec();
    let media_addrs = handles.iter().map(|w| w.candidates().to_vec()).collect();
    let control = Arc::new(Control::new(
        apps.clone(),
        handles,
        certificate,
        config.ingress.into(),
        config.max_worker_load,
    ));
    control::spawn_event_loop(control.clone(), events_rx);

    let listener = tokio::net::TcpListener::bind(config.http).await?;
    let http_addr = listener.local_addr()?;
    let api = http::router(control.clone());
    let default_app = apps.list()[0].clone();
    let app = api.clone().merge(demo::router(default_app, api));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!("HTTP server failed: {e}");
        }
    });
    Ok(Server {
        http_addr,
        apps,
        media_addrs,
        control,
        plane: Some(plane),
        http,
        shutdown: Some(tx),
    })
}
