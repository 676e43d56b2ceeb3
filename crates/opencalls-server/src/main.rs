//! `opencalls serve`: parse the command line, start, print how to connect, wait for a
//! signal, shut down.

use clap::Parser;
use opencalls_server::config::{Cli, CliCommand};

/// mimalloc: str0m allocates and frees buffers per packet (our egress path seals into the
/// outbox's buffer instead); glibc's allocator spent ~7 % of a worker's core on them when
/// ours allocated per packet and subscriber too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    no_transparent_huge_pages();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve())
}

/// Turns transparent huge pages off for the whole process, before the runtime and the media
/// workers start. mimalloc asks for them on its arenas, and the first touch of each 2 MiB
/// page is zeroed inside whatever touched it: a media worker growing a map for a new
/// session stalled forwarding for 5 to 40 ms, so during a join storm (100 joins a second
/// over a webinar) the other participants' media p99 was 6 to 26 ms; without them, ~1 ms,
/// at the same CPU per packet (docs/benchmarks.md).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!(
            "could not turn transparent huge pages off ({e}); media may stall on page faults"
        );
    }
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "opencalls_server=info,opencalls_sfu=info,warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let CliCommand::Serve(config) = cli.command;
    let server = opencalls_server::start(config).await?;
    // Before the banner: whoever reads "ready" may stop us at once.
    let stop = shutdown_signal();
    println!("opencalls is ready");
    println!(
        "  demo:          {}/  (echo: /demo/echo, room: /demo/room)",
        server.origin()
    );
    println!("  API base URL:  {}", server.api_base_url());
    for app in server.apps.list() {
        println!("  app id:        {}", app.id);
        println!("  app secret:    {}", app.secret);
    }
    for (k, addrs) in server.media_addrs.iter().enumerate() {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        println!("  media worker {k}: udp {}", list.join(", "));
    }
    println!("Press Ctrl-C to stop.");
    stop.await;
    println!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now and returns what waits for either. A
/// signal that comes before the handlers exist kills the process uncleanly, so this runs
/// before anything announces the server.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
