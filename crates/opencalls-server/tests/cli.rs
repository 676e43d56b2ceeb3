//! The `opencalls` binary as a user runs it: the default app is created once and survives
//! restarts, startup prints how to connect, /healthz answers, SIGTERM stops it cleanly, and
//! the process runs without transparent huge pages.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opencalls_testkit::api::raw_request;

struct Started {
    child: Child,
    app: String,
    secret: String,
    http: std::net::SocketAddr,
    banner: String,
}

fn start(data_dir: &std::path::Path) -> Started {
    let mut child = Command::new(env!("CARGO_BIN_EXE_opencalls"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
            "--workers",
            "1",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("OPENCALLS_APPS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn opencalls");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.expect("stdout");
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    let field = |name: &str| {
        banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in banner:\n{banner}"))
    };
    let app = field("app id:");
    let secret = field("app secret:");
    let base = field("API base URL:");
    let port: u16 = base
        .trim_end_matches("/v1")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in the API base URL");
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Started {
        child,
        app,
        secret,
        http: format!("127.0.0.1:{port}").parse().unwrap(),
        banner,
    }
}

fn sigterm_and_wait(mut s: Started) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = s.child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > end {
            let _ = s.child.kill();
            panic!("opencalls did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn default_app_persists_and_sigterm_is_clean() {
    let dir = std::env::temp_dir().join(format!("opencalls-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let first = start(&dir);
    assert_eq!(first.app.len(), 32, "Calls-like app id: {}", first.app);
    assert!(
        first.banner.contains("demo:"),
        "banner tells where the demo is"
    );
    let h = raw_request(first.http, "GET", "/healthz", &[], None);
    assert_eq!(h.status, 200);
    // The printed credentials work.
    let auth = format!("Bearer {}", first.secret);
    let r = raw_request(
        first.http,
        "POST",
        &format!("/v1/apps/{}/sessions/new", first.app),
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let (app, secret) = (first.app.clone(), first.secret.clone());
    assert!(sigterm_and_wait(first).success(), "clean exit on SIGTERM");

    let second = start(&dir);
    assert_eq!(
        (second.app.as_str(), second.secret.as_str()),
        (app.as_str(), secret.as_str()),
        "same app after a restart"
    );
    assert!(sigterm_and_wait(second).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The process runs without transparent huge pages (see `no_transparent_huge_pages` in
/// main.rs: a 2 MiB page's first touch stalled a media worker for milliseconds).
#[cfg(target_os = "linux")]
#[test]
fn transparent_huge_pages_are_off() {
    let dir = std::env::temp_dir().join(format!("opencalls-cli-thp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = start(&dir);
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id()))
        .expect("the server's /proc status");
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    // Stop the server before asserting, so a failure leaves no process behind.
    let stopped = sigterm_and_wait(s);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(thp, Some("0"), "THP_enabled in /proc/PID/status:\n{status}");
    assert!(stopped.success());
}
