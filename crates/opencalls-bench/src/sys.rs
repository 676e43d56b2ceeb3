//! What the kernel says about CPU and memory, and core pinning (through `taskset`, so the
//! crate needs no unsafe code).

use std::process::Command;

/// Cumulative jiffies of one CPU: (busy incl. irq/softirq/steal, total).
pub fn cpu_jiffies(cpu: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let name = format!("cpu{cpu} ");
    for line in stat.lines() {
        if let Some(rest) = line.strip_prefix(&name) {
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            if v.len() >= 8 {
                let idle = v[3] + v[4];
                let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
                return (busy, busy + idle);
            }
        }
    }
    (0, 0)
}

/// Busy fraction of a CPU between two samples.
pub fn busy_between(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return 0.0;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64
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
