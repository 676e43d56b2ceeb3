//! How busy a worker is: the share of wall time it spends outside its wait for input.
//!
//! A worker that keeps up with its sockets sleeps between datagrams; one that cannot never
//! sleeps, its socket queue fills and the kernel drops datagrams of every session on it,
//! including new sessions' ICE and DTLS handshakes. The control plane reads this figure,
//! beside the kernel's drop count of the worker's sockets (the definite sign), to stop
//! placing sessions on a worker with no room (see `Control::place` in the server), so
//! overload refuses the newcomer instead of degrading everyone already there. Busy is not
//! full: a worker that never sleeps may still keep up, its batches filling and its cost
//! per packet falling (audio-room on the AMD guest: 4.9 µs per copy at 0.98 of a core, 2.5
//! at twice the listeners, no loss), which is why the limit on this figure defaults to 1.
//!
//! Wall time, not the thread's CPU time: time the thread is runnable but preempted (by
//! softirq work or another process on the core) is time it does not read its sockets
//! either.

use std::time::{Duration, Instant};

/// Per mille: the unit the meter publishes (an integer fits an atomic).
pub const FULL: u32 = 1000;

/// Weight of the newest window in the smoothed figure. With the worker's housekeeping
/// every 500 ms, a step change shows half after one window and seven eighths after three.
const NEWEST: f64 = 0.5;

/// Accumulates a worker's waits and turns them into a smoothed busy share.
#[derive(Debug)]
pub struct LoadMeter {
    window_start: Instant,
    waited: Duration,
    smoothed: f64,
}

impl LoadMeter {
    /// A meter whose first window starts at `now`, reading idle.
    pub fn new(now: Instant) -> LoadMeter {
        LoadMeter {
            window_start: now,
            waited: Duration::ZERO,
            smoothed: 0.0,
        }
    }

    /// The worker waited for input from `from` to `to`.
    pub fn waited(&mut self, from: Instant, to: Instant) {
        self.waited += to.saturating_duration_since(from);
    }

    /// Ends the window at `now`; returns the smoothed busy share in per mille.
    pub fn sample(&mut self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.window_start);
        if !elapsed.is_zero() {
            let idle = (self.waited.as_secs_f64() / elapsed.as_secs_f64()).min(1.0);
            self.smoothed = NEWEST * (1.0 - idle) + (1.0 - NEWEST) * self.smoothed;
        }
        self.window_start = now;
        self.waited = Duration::ZERO;
        (self.smoothed * f64::from(FULL)).round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(m: &mut LoadMeter, start: Instant, waited_ms: u64) -> (Instant, u32) {
        let end = start + Duration::from_millis(500);
        m.waited(start, start + Duration::from_millis(waited_ms));
        (end, m.sample(end))
    }

    /// `n` windows alike; when the last ended and what it read.
    fn windows(m: &mut LoadMeter, start: Instant, n: usize, waited_ms: u64) -> (Instant, u32) {
        let (mut t, mut last) = (start, 0);
        for _ in 0..n {
            (t, last) = window(m, t, waited_ms);
        }
        (t, last)
    }

    #[test]
    fn a_worker_that_never_waits_reads_full_after_a_few_windows_and_idle_again_after_it_rests() {
        let t0 = Instant::now();
        let mut m = LoadMeter::new(t0);
        let (t, first) = window(&mut m, t0, 0);
        assert_eq!(first, 500);
        let (t, second) = window(&mut m, t, 0);
        assert_eq!(second, 750);
        let (t, busy) = windows(&mut m, t, 12, 0);
        assert_eq!(busy, FULL);
        let (_, rested) = windows(&mut m, t, 12, 500);
        assert_eq!(rested, 0);
    }

    #[test]
    fn a_worker_waiting_a_fifth_of_the_time_settles_at_four_fifths() {
        let t0 = Instant::now();
        let mut m = LoadMeter::new(t0);
        assert_eq!(windows(&mut m, t0, 20, 100).1, 800);
    }

    #[test]
    fn waits_longer_than_the_window_and_an_empty_window_do_not_break_the_figure() {
        let t0 = Instant::now();
        let mut m = LoadMeter::new(t0);
        m.waited(t0, t0 + Duration::from_secs(5));
        assert_eq!(m.sample(t0 + Duration::from_millis(500)), 0);
        let t = t0 + Duration::from_millis(500);
        assert_eq!(m.sample(t), 0);
        // A clock read out of order (to before from) counts as no wait.
        m.waited(t + Duration::from_millis(10), t);
        assert_eq!(m.sample(t + Duration::from_millis(500)), 500);
    }
}
