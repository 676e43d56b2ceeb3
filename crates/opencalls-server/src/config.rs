//! Command line and environment configuration of `opencalls serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// opencalls: a self-hostable SFU that speaks the Cloudflare Calls API.
#[derive(Debug, Parser)]
#[command(name = "opencalls", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the HTTP API and the media plane.
    Serve(ServeConfig),
}

/// `opencalls serve` settings; every flag also reads an `OPENCALLS_*` variable.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// HTTP API listen address.
    #[arg(long, env = "OPENCALLS_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Media bind address; worker k uses port + k (port 0: any free port per worker).
    #[arg(long, env = "OPENCALLS_UDP", default_value = "0.0.0.0:50000")]
    pub udp: SocketAddr,
    /// Address advertised in ICE candidates (default: the bind address, or every
    /// interface address when binding to 0.0.0.0).
    #[arg(long, env = "OPENCALLS_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// An app this server accepts, as ID:SECRET (repeatable). Without any, a default app
    /// is created once and kept in the data directory.
    #[arg(long = "app", env = "OPENCALLS_APPS", value_delimiter = ',')]
    pub apps: Vec<String>,
    /// Media worker threads (default: number of cores).
    #[arg(long, env = "OPENCALLS_WORKERS")]
    pub workers: Option<usize>,
    /// Where the default app is kept.
    #[arg(long, env = "OPENCALLS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds a session may stay unconnected, or disconnected, before it is closed; also
    /// how long a published track may receive no media.
    #[arg(long, env = "OPENCALLS_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub idle_timeout_secs: u64,
    /// The AES-GCM library that seals forwarded packets: `auto` times ring's and aws-lc-rs's
    /// in a loop at start and keeps the faster on this CPU (where that is aws-lc-rs's, ring's
    /// still seals fan-outs of 128 subscribers or more, whose keys are cold).
    #[arg(long, env = "OPENCALLS_AES_GCM", value_enum, default_value_t = AesGcmArg::Auto)]
    pub aes_gcm: AesGcmArg,
    /// Who opens publishers' RTP: `beside` (our own path beside str0m: SRTP, replay window,
    /// transport-cc feedback, NACKs, RTX and receiver reports; str0m keeps the publisher's
    /// RTCP and keyframe requests) or `str0m`.
    #[arg(long, env = "OPENCALLS_INGRESS", value_enum, default_value_t = IngressArg::Beside)]
    pub ingress: IngressArg,
    /// A media worker's busy share of wall time (0 to 1, smoothed over about a second) at
    /// which it takes no new session. A worker whose socket queue overflowed in the last
    /// second takes none whatever this says; `sessions/new` answers 503 with `Retry-After`
    /// when no worker is left. The default, 1, refuses only workers that never wait for
    /// input: a batching worker busy all the time may still have room (its cost per packet
    /// falls as its batches fill), so a lower limit trades capacity for latency headroom.
    #[arg(long, env = "OPENCALLS_MAX_WORKER_LOAD", default_value_t = 1.0, value_parser = load_share)]
    pub max_worker_load: f64,
}

/// Parses `--max-worker-load`: a share from 0 to 1.
fn load_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// `--ingress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IngressArg {
    /// Our receive path beside str0m (AES-GCM profiles; others stay with str0m).
    Beside,
    /// str0m's.
    Str0m,
}

impl From<IngressArg> for opencalls_sfu::IngressPath {
    fn from(a: IngressArg) -> Self {
        match a {
            IngressArg::Beside => opencalls_sfu::IngressPath::Beside,
            IngressArg::Str0m => opencalls_sfu::IngressPath::Str0m,
        }
    }
}

/// `--aes-gcm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AesGcmArg {
    /// Time both in a loop at start, keep the faster (aws-lc-rs: ring for wide fan-outs).
    Auto,
    /// ring.
    Ring,
    /// aws-lc-rs.
    AwsLc,
}

impl From<AesGcmArg> for opencalls_sfu::AesGcm {
    fn from(a: AesGcmArg) -> Self {
        match a {
            AesGcmArg::Auto => opencalls_sfu::AesGcm::Auto,
            AesGcmArg::Ring => opencalls_sfu::AesGcm::Ring,
            AesGcmArg::AwsLc => opencalls_sfu::AesGcm::AwsLc,
        }
    }
}

impl ServeConfig {
    /// A configuration for tests: loopback only, ephemeral ports, one app.
    pub fn for_tests(app: &str, secret: &str, workers: usize) -> ServeConfig {
        ServeConfig {
            http: "127.0.0.1:0".parse().expect("static address"),
            udp: "127.0.0.1:0".parse().expect("static address"),
            public_ip: None,
            apps: vec![format!("{app}:{secret}")],
            workers: Some(workers),
            data_dir: None,
            idle_timeout_secs: 30,
            aes_gcm: AesGcmArg::Auto,
            ingress: IngressArg::Beside,
            max_worker_load: 1.0,
        }
    }

    /// The data directory: flag, else `$XDG_DATA_HOME/opencalls`, else
    /// `$HOME/.local/share/opencalls`, else `./.opencalls`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(x).join("opencalls");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".local/share/opencalls");
        }
        PathBuf::from(".opencalls")
    }
}
