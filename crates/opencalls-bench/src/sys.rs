//! What the kernel says about CPU and memory, and core pinning (through `taskset`, so the
//! crate needs no unsafe code).

use std::process::Command;

/// USER_HZ: the unit of `/proc/stat` (fixed at 100 by the kernel's ABI on every architecture
/// this runs on).
const USER_HZ: f64 = 100.0;

/// One CPU's idle and steal time and the wall clock, read together.
///
/// Busy time is what the CPU was neither idle nor stolen: wall time minus idle minus steal.
/// The kernel's per-CPU busy fields (user, system, softirq…) are sampled at the scheduler
/// tick (4 ms here), and a server that works in short bursts at a fixed period (a fan-out
/// every 20 ms for audio) can fall between ticks every time, or on them: at light load those
/// fields were off by up to ten times either way. Idle time is not sampled: with a tickless
/// idle kernel (`NO_HZ_IDLE`, the default on Debian and here) it is measured from the idle
/// entry and exit timestamps. Steal time (the vCPU was ready to run and the hypervisor ran
/// something else) is not sampled either: it is the hypervisor's own count, read from the
/// paravirtual steal clock. It is no work of the server's, and on a shared host it came and
/// went by the second: over two back-to-back meeting-4 runs it was 42 % and 31 % on top of
/// the server core's user, system and softirq time (counted as busy until the twenty-second
/// session).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// idle + iowait, in USER_HZ ticks.
    idle: u64,
    /// steal, in USER_HZ ticks.
    steal: u64,
    at: std::time::Instant,
}

/// Samples CPU `cpu`.
pub fn cpu_sample(cpu: usize) -> CpuSample {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let (idle, steal) = idle_and_steal_ticks(&stat, cpu).unwrap_or((0, 0));
    CpuSample {
        idle,
        steal,
        at: std::time::Instant::now(),
    }
}

/// (idle + iowait, steal) of `cpu` in `/proc/stat` text.
fn idle_and_steal_ticks(stat: &str, cpu: usize) -> Option<(u64, u64)> {
    let name = format!("cpu{cpu} ");
    let rest = stat.lines().find_map(|l| l.strip_prefix(&name))?;
    // user nice system idle iowait irq softirq steal …
    let v: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() >= 8).then(|| (v[3] + v[4], v[7]))
}

/// Busy fraction of a CPU between two samples (0 to 1): neither idle nor stolen.
pub fn busy_between(a: CpuSample, b: CpuSample) -> f64 {
    let idle = b.idle.saturating_sub(a.idle);
    let steal = b.steal.saturating_sub(a.steal);
    share_of_wall(a, b, idle + steal).map_or(0.0, |s| (1.0 - s).clamp(0.0, 1.0))
}

/// Fraction of the wall time between two samples the hypervisor took from the CPU.
pub fn steal_between(a: CpuSample, b: CpuSample) -> f64 {
    share_of_wall(a, b, b.steal.saturating_sub(a.steal)).map_or(0.0, |s| s.clamp(0.0, 1.0))
}

/// `ticks` (USER_HZ) as a share of the wall time from `a` to `b`; `None` if none passed.
fn share_of_wall(a: CpuSample, b: CpuSample, ticks: u64) -> Option<f64> {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    (wall > 0.0).then(|| ticks as f64 / USER_HZ / wall)
}

/// Resident set size of a process in MB.
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Pins this process (all its threads) to `cpu`.
pub fn pin_self(cpu: usize) {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid])
        .output();
}

/// Number of CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU model this runs on (`model name` in `/proc/cpuinfo`), so every result names its
/// host: the shared guests this benchmark runs on change kind between days, and their
/// kernels' cost per datagram differs by about two times.
pub fn cpu_model() -> Option<String> {
    model_name(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first `model name` of `/proc/cpuinfo` text.
fn model_name(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "model name")
            .then(|| value.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const STAT: &str = "cpu  1479502 11394 347725 1844628 17499 0 79108 30810 0 0\n\
        cpu0 626320 5685 151801 1080229 4076 0 9390 19807 0 0\n\
        cpu1 853182 5709 195923 764398 13423 0 69718 11003 0 0\n\
        intr 1 2 3\n";

    #[test]
    fn idle_is_idle_plus_iowait_and_steal_is_steal_of_the_named_cpu() {
        assert_eq!(
            idle_and_steal_ticks(STAT, 0),
            Some((1_080_229 + 4_076, 19_807))
        );
        assert_eq!(
            idle_and_steal_ticks(STAT, 1),
            Some((764_398 + 13_423, 11_003))
        );
        assert_eq!(idle_and_steal_ticks(STAT, 2), None);
        assert_eq!(idle_and_steal_ticks("cpu1 1 2 x 4 5 6 7 8\n", 1), None);
        assert_eq!(idle_and_steal_ticks("cpu1 1 2 3\n", 1), None);
    }

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\n\
            model name\t: AMD EPYC\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(model_name(info).as_deref(), Some("AMD EPYC"));
        assert_eq!(model_name("processor\t: 0\nmodel\t\t: 17\n"), None);
        assert_eq!(model_name("model name\t:\n"), None);
    }

    #[test]
    fn busy_is_wall_time_neither_idle_nor_stolen() {
        let t = Instant::now();
        let at = |ms: u64, idle: u64, steal: u64| CpuSample {
            idle,
            steal,
            at: t + Duration::from_millis(ms),
        };
        // 5 s of wall time, 4 s (400 ticks) of them idle: 20 % busy.
        assert!((busy_between(at(0, 1000, 7), at(5000, 1400, 7)) - 0.2).abs() < 1e-9);
        // Of the 1 s not idle, 0.5 s stolen: 10 % busy, 10 % stolen.
        let (a, b) = (at(0, 1000, 7), at(5000, 1400, 57));
        assert!((busy_between(a, b) - 0.1).abs() < 1e-9);
        assert!((steal_between(a, b) - 0.1).abs() < 1e-9);
        // Fully idle, fully busy, and idle rounding past the wall time clamps.
        assert_eq!(busy_between(at(0, 0, 0), at(1000, 100, 0)), 0.0);
        assert_eq!(busy_between(at(0, 0, 0), at(1000, 0, 0)), 1.0);
        assert_eq!(busy_between(at(0, 0, 0), at(1000, 101, 0)), 0.0);
        assert_eq!(busy_between(at(0, 0, 0), at(1000, 60, 60)), 0.0);
        assert_eq!(busy_between(at(0, 0, 0), at(0, 0, 0)), 0.0);
        assert_eq!(steal_between(at(0, 0, 0), at(0, 0, 5)), 0.0);
    }
}
