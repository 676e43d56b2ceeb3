//! `opencalls-bench`: how many participants one core carries, measured side by side with the
//! physical limit (a plaintext UDP relay) in the same run.
//!
//! `cargo run --release -p opencalls-bench -- SCENARIO [--target opencalls|raw|janus|all] [--quick] --json FILE`
//!
//! The run re-executes itself inside a network namespace it creates (root needed), where
//! every target's media uses 10.213.0.1 (or 127.0.0.1 with `--loopback`: opencalls and raw). The generator pins itself to core 0 and the server under test to core 1. Each step builds
//! its topology from scratch (fresh server), warms up, then measures a window: RTP packets
//! the subscribers received per second (`out_pps`), the server core's busy share (wall time
//! minus the kernel's tickless idle time: softirq and steal included, see `sys`), loss from
//! sequence gaps, added latency from the
//! publisher's abs-capture-time, and the server's RSS. A step whose generator core was
//! saturated is reported `valid: false`.

mod janus;
mod peer;
mod raw;
mod raw_client;
mod rtp;
mod rx;
mod storm;
mod sys;
mod world;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::world::{Scenario, Sending, StepResult, Target};

#[derive(Debug, Parser)]
#[command(name = "opencalls-bench")]
struct Cli {
    /// audio-room | webinar | meeting | join-storm | api, or `relay` (internal: the raw relay).
    scenario: String,
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    target: TargetArg,
    /// A short ramp (under 3 minutes for all targets).
    #[arg(long)]
    quick: bool,
    /// Publishers send each video frame's packets back to back instead of through a pacer
    /// (libwebrtc paces at 2.5x the bitrate): the keyframe-burst worst case.
    #[arg(long)]
    burst: bool,
    /// Media on 127.0.0.1 instead of the namespace's veth address (opencalls and raw only,
    /// `all` means those two: Janus gathers no loopback candidates). A cross-check: sends
    /// to a local veth address cost every target about 1.4 µs more per packet in the
    /// kernel (uncached route).
    #[arg(long)]
    loopback: bool,
    /// Also report latency to the kernel's queueing of each datagram on the subscriber's
    /// socket (`SO_TIMESTAMPNS`): `p50_socket_ms`/`p99_socket_ms`, the generator's reading
    /// taken out. `p50_ms`/`p99_ms` stay latency to the generator's read.
    #[arg(long)]
    socket_times: bool,
    /// The generator sleeps on a 1 ms timer and then polls its sockets, instead of sleeping
    /// until one is readable, so deliveries never wake it (the server's core pays for every
    /// such wakeup on loopback, which remote receivers never cost). Implies --socket-times;
    /// p50_ms/p99_ms are then at the socket. An experiment: every other run reads on wakeup.
    #[arg(long)]
    timer_reads: bool,
    /// Run each step this many times per target and keep the round with the median out pps
    /// per core (each line lists every round's figure): this machine's spread between runs
    /// is larger than most differences worth telling.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// One JSON object per line and step.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these step sizes (comma-separated `n` values) instead of the ramp: repeated
    /// A/B runs of one step are how small changes are told apart on a noisy machine.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<usize>,
    /// Relay mode: port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Relay mode: seconds to run before exiting.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Relay mode: address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    ip: std::net::IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetArg {
    Opencalls,
    Raw,
    Janus,
    All,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.scenario == "relay" {
        return Ok(raw::run_relay(
            cli.ip,
            cli.port,
            Duration::from_secs(cli.seconds),
        )?);
    }
    // Every target runs inside a network namespace of the run's own (Janus's libnice gathers
    // no loopback candidates, so media uses a veth address that exists only in there).
    janus::reexec_in_netns(janus::NETNS_IP, Duration::from_secs(3600))?;
    let scenario = Scenario::parse(&cli.scenario)?;
    rx::set_socket_times(cli.socket_times);
    rx::set_timer_reads(cli.timer_reads);
    if cli.loopback {
        anyhow::ensure!(
            cli.target != TargetArg::Janus,
            "--loopback runs opencalls and raw only (Janus needs a non-loopback address)"
        );
        world::set_media_ip(std::net::Ipv4Addr::LOCALHOST.into());
    } else {
        world::set_media_ip(janus::NETNS_IP.into());
    }
    let json_path = cli
        .json
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--json FILE is required"))?;
    let mut out = std::fs::File::create(&json_path)?;
    if sys::cpus() < 2 {
        anyhow::bail!("needs at least 2 CPUs: the generator and the server are pinned apart");
    }
    sys::pin_self(0);

    let mut targets = match cli.target {
        TargetArg::All => vec![Target::Raw, Target::Opencalls, Target::Janus],
        TargetArg::Raw => vec![Target::Raw],
        TargetArg::Opencalls => vec![Target::Opencalls],
        TargetArg::Janus => vec![Target::Janus],
    };
    if cli.loopback {
        targets.retain(|t| *t != Target::Janus);
    }
    if scenario == Scenario::Api {
        targets.retain(|t| *t != Target::Raw); // a UDP relay has no API
    }
    let steps = if cli.steps.is_empty() {
        scenario.steps(cli.quick)
    } else {
        cli.steps.iter().map(|n| world::Step { n: *n }).collect()
    };
    let sending = if cli.burst {
        Sending::Burst
    } else {
        Sending::Paced
    };
    // The raw relay's result per step, with the p99 its knee test uses.
    let mut raw_results: Vec<Option<(StepResult, Option<f64>)>> = vec![None; steps.len()];
    // Step by step, every target still ramping runs once per round, in turn (raw first), so
    // the targets compared at a step ran within the same minutes: a shared host's load
    // drifts over a run, and a target's steps run back to back would meet another part of
    // that drift than the others' (at light steps it moved a target's figure by half).
    let mut ramping = targets;
    for (i, step) in steps.iter().enumerate() {
        // Each ramping target's results at this step, or the error that ended its ramp.
        let mut per_target: Vec<anyhow::Result<Vec<StepResult>>> =
            ramping.iter().map(|_| Ok(Vec::new())).collect();
        for _ in 0..cli.rounds.max(1) {
            for (target, runs) in ramping.iter().zip(per_target.iter_mut()) {
                let Ok(done) = runs else {
                    continue;
                };
                eprintln!(
                    "{} {} step {} ({})",
                    scenario.name(),
                    target.name(),
                    i,
                    step.describe()
                );
                match world::run_step(*target, scenario, step, cli.quick, sending) {
                    Ok(r) => done.push(r),
                    Err(e) => *runs = Err(e),
                }
            }
        }
        let mut stopped = Vec::new();
        for (target, runs) in ramping.iter().copied().zip(per_target) {
            let (r, rounds, server_p99s) = match runs {
                Ok(rs) => {
                    let server: Vec<Option<f64>> =
                        rs.iter().map(|r| r.server_ms.map(|s| s.1)).collect();
                    let (r, rounds) = median_round(rs);
                    (r, rounds, server)
                }
                Err(e) => {
                    eprintln!("  error: {e:#}");
                    let line = json!({
                        "scenario": scenario.name(), "step": i, "target": target.name(),
                        "n": step.n, "sending": sending.name(), "valid": false, "error": format!("{e:#}"),
                        "cpu_model": sys::cpu_model(),
                        "out_pps": null, "server_busy_cores": null, "out_pps_per_core": null,
                        "ratio_to_raw": null, "loss": null, "p50_ms": null, "p99_ms": null, "rss_mb": null,
                    });
                    writeln!(out, "{line}")?;
                    stopped.push(target);
                    continue;
                }
            };
            let raw = raw_results[i].as_ref().map(|(r, _)| r);
            let ratio = match (target, raw) {
                (Target::Raw, _) | (_, None) => None,
                (_, Some(raw)) if raw.out_pps_per_core() > 0.0 => {
                    Some(r.out_pps_per_core() / raw.out_pps_per_core())
                }
                _ => None,
            };
            let mut line = r.to_json(scenario, i, target, step, ratio);
            line["sending"] = json!(sending.name());
            line["media_ip"] = json!(world::media_ip().to_string());
            line["cpu_model"] = json!(sys::cpu_model());
            line["reads"] = json!(if rx::timer_reads() { "timer" } else { "wakeup" });
            if rounds.len() > 1 {
                line["rounds"] = json!(rounds.len());
                line["rounds_out_pps_per_core"] =
                    json!(rounds.iter().map(|r| r.0.round()).collect::<Vec<_>>());
                let ms = |ps: &mut dyn Iterator<Item = Option<f64>>| {
                    json!(ps.map(|p| p.map(world::round3)).collect::<Vec<_>>())
                };
                line["rounds_p99_ms"] = ms(&mut rounds.iter().map(|r| r.1));
                if server_p99s.iter().any(Option::is_some) {
                    line["rounds_p99_server_ms"] = ms(&mut server_p99s.iter().copied());
                }
            }
            eprintln!("  {line}");
            writeln!(out, "{line}")?;
            out.flush()?;
            // With several rounds, latency is judged on the rounds' median p99 (the kept
            // round was chosen by throughput, not latency).
            let p99 = median_p99(&rounds).or(r.p99_ms);
            let knee = r.loss > 0.001
                || r.join_failures > 0
                || match (raw_results[i].as_ref().and_then(|(_, p)| *p), p99) {
                    (Some(raw), Some(p99)) => p99 > raw + 10.0,
                    _ => false,
                };
            if target == Target::Raw {
                raw_results[i] = Some((r, p99));
            } else if knee {
                eprintln!("  {} reached its knee at step {i}", target.name());
                stopped.push(target);
            }
        }
        ramping.retain(|t| !stopped.contains(t));
        if ramping.is_empty() {
            break;
        }
    }
    Ok(())
}

/// The median (lower middle) of the rounds' p99s that exist.
fn median_p99(rounds: &[(f64, Option<f64>)]) -> Option<f64> {
    let mut v: Vec<f64> = rounds.iter().filter_map(|r| r.1).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len().checked_sub(1)? / 2).copied()
}

/// Of several rounds of one step, the one with the median out pps per core (the lower middle
/// for an even count), and every round's (out pps per core, p99) in the order they ran.
fn median_round(mut rs: Vec<StepResult>) -> (StepResult, Vec<(f64, Option<f64>)>) {
    let all = rs
        .iter()
        .map(|r| (r.out_pps_per_core(), r.p99_ms))
        .collect();
    rs.sort_by(|a, b| a.out_pps_per_core().total_cmp(&b.out_pps_per_core()));
    let mid = (rs.len() - 1) / 2;
    (rs.swap_remove(mid), all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(out_pps: f64, p99: f64) -> StepResult {
        StepResult {
            out_pps,
            server_busy_cores: 0.5,
            p99_ms: Some(p99),
            ..Default::default()
        }
    }

    #[test]
    fn the_median_round_is_kept_and_every_round_is_listed_in_order() {
        let (kept, all) = median_round(vec![step(300.0, 3.0), step(100.0, 1.0), step(200.0, 2.0)]);
        assert_eq!(kept.out_pps, 200.0);
        assert_eq!(
            all,
            vec![(600.0, Some(3.0)), (200.0, Some(1.0)), (400.0, Some(2.0))]
        );
        let (kept, _) = median_round(vec![step(400.0, 1.0), step(100.0, 1.0)]);
        assert_eq!(kept.out_pps, 100.0, "the lower middle of an even count");
        let (kept, all) = median_round(vec![step(50.0, 1.0)]);
        assert_eq!((kept.out_pps, all.len()), (50.0, 1));
        assert_eq!(
            median_p99(&[
                (1.0, Some(9.0)),
                (2.0, None),
                (3.0, Some(2.0)),
                (4.0, Some(5.0))
            ]),
            Some(5.0)
        );
        assert_eq!(median_p99(&[(1.0, None)]), None);
    }
}
