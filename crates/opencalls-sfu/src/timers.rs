//! When each session's str0m state must run next.
//!
//! After every drain str0m names one deadline for the session. Nearly every write to a
//! subscriber makes that deadline "already due" (str0m's pacer releases written packets only
//! from a timeout), so those go on a due list that the worker fires in the same loop turn,
//! once per session however many packets it got. Later deadlines go into a heap that holds
//! about one live entry per session: a deadline later than the session's current wake needs
//! no entry (waking early is harmless: str0m takes the timeout and names its deadline again),
//! and entries a session no longer holds are skipped when they come up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::command::SessionKey;

/// A session's place in the worker's timers.
#[derive(Debug, Default)]
pub(crate) struct SessionTimer {
    /// The heap entry this session holds; older entries of it are stale.
    heap: Option<Instant>,
    /// Whether it is on the due list.
    due: bool,
}

impl SessionTimer {
    /// Reads the timer's state, for `Session::touch`.
    pub fn touch(&self) -> u64 {
        u64::from(self.due)
    }
}

/// What carries a [`SessionTimer`] (a session; in tests, the timer itself).
pub(crate) trait HasTimer {
    fn timer(&mut self) -> &mut SessionTimer;
}

impl HasTimer for SessionTimer {
    fn timer(&mut self) -> &mut SessionTimer {
        self
    }
}

pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, SessionKey)>>,
    due: Vec<SessionKey>,
    /// The latest time handed to str0m; a deadline not after it is due.
    clock: Instant,
}

impl Timers {
    pub fn new(now: Instant) -> Timers {
        Timers {
            heap: BinaryHeap::new(),
            due: Vec::new(),
            clock: now,
        }
    }

    /// The worker is about to hand str0m the time `now`.
    pub fn advance(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
    }

    /// str0m named deadline `t` for session `key`.
    pub fn schedule(&mut self, key: SessionKey, timer: &mut SessionTimer, t: Instant) {
        if t <= self.clock {
            if !timer.due {
                timer.due = true;
                self.due.push(key);
            }
        } else if timer.heap.is_none_or(|h| t < h) {
            timer.heap = Some(t);
            self.heap.push(Reverse((t, key)));
        }
    }

    /// When the worker must wake next (the clock itself while anything is due).
    pub fn next_wake(&self) -> Option<Instant> {
        if !self.due.is_empty() {
            return Some(self.clock);
        }
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Moves the clock to `now` and puts into `out` every session to run now, in order: the
    /// due list, then heap wakes up to `now` that are still their session's. Sessions gone
    /// from `sessions` are dropped. Running them may schedule again: what falls due then
    /// waits for the next call.
    pub fn expired<S: HasTimer>(
        &mut self,
        now: Instant,
        sessions: &mut FxHashMap<SessionKey, S>,
        out: &mut Vec<SessionKey>,
    ) {
        self.advance(now);
        for key in self.due.drain(..) {
            if let Some(s) = sessions.get_mut(&key) {
                let timer = s.timer();
                timer.due = false;
                // Running now covers a heap wake that is due too; its entry turns stale.
                if timer.heap.is_some_and(|h| h <= now) {
                    timer.heap = None;
                }
                out.push(key);
            }
        }
        while let Some(Reverse((t, key))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            let Some(s) = sessions.get_mut(&key) else {
                continue;
            };
            let timer = s.timer();
            if timer.heap != Some(t) {
                continue; // stale: the session holds an earlier or newer wake
            }
            timer.heap = None;
            out.push(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn setup(n: u64) -> (Instant, Timers, FxHashMap<SessionKey, SessionTimer>) {
        let t0 = Instant::now();
        let sessions = (1..=n)
            .map(|k| (SessionKey(k), SessionTimer::default()))
            .collect();
        (t0, Timers::new(t0), sessions)
    }

    fn schedule(
        timers: &mut Timers,
        sessions: &mut FxHashMap<SessionKey, SessionTimer>,
        k: u64,
        t: Instant,
    ) {
        let timer = sessions.get_mut(&SessionKey(k)).unwrap();
        timers.schedule(SessionKey(k), timer, t);
    }

    fn expired(
        timers: &mut Timers,
        sessions: &mut FxHashMap<SessionKey, SessionTimer>,
        now: Instant,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        timers.expired(now, sessions, &mut out);
        out.into_iter().map(|k| k.0).collect()
    }

    #[test]
    fn a_due_deadline_runs_once_per_turn_however_often_it_was_named() {
        let (t0, mut timers, mut sessions) = setup(2);
        for _ in 0..5 {
            schedule(&mut timers, &mut sessions, 2, t0);
            schedule(&mut timers, &mut sessions, 1, t0);
        }
        assert_eq!(timers.next_wake(), Some(t0), "something is due: wake now");
        assert_eq!(expired(&mut timers, &mut sessions, t0), [2, 1]);
        assert_eq!(expired(&mut timers, &mut sessions, t0), Vec::<u64>::new());
        // Due again after it ran (the next packet).
        schedule(&mut timers, &mut sessions, 1, t0);
        assert_eq!(expired(&mut timers, &mut sessions, ms(t0, 1)), [1]);
    }

    #[test]
    fn a_later_deadline_keeps_the_earlier_wake_and_an_earlier_one_replaces_it() {
        let (t0, mut timers, mut sessions) = setup(1);
        schedule(&mut timers, &mut sessions, 1, ms(t0, 50));
        schedule(&mut timers, &mut sessions, 1, ms(t0, 80));
        assert_eq!(timers.heap.len(), 1, "no entry for a later deadline");
        schedule(&mut timers, &mut sessions, 1, ms(t0, 20));
        assert_eq!(timers.next_wake(), Some(ms(t0, 20)));
        assert_eq!(
            expired(&mut timers, &mut sessions, ms(t0, 10)),
            Vec::<u64>::new()
        );
        assert_eq!(expired(&mut timers, &mut sessions, ms(t0, 20)), [1]);
        // The 50 ms entry is stale now: the session ran at 20 and holds no wake.
        assert_eq!(
            expired(&mut timers, &mut sessions, ms(t0, 60)),
            Vec::<u64>::new()
        );
        assert_eq!(timers.next_wake(), None);
        // It can be woken again.
        schedule(&mut timers, &mut sessions, 1, ms(t0, 90));
        assert_eq!(expired(&mut timers, &mut sessions, ms(t0, 95)), [1]);
    }

    #[test]
    fn a_session_due_and_waking_in_one_turn_runs_once() {
        let (t0, mut timers, mut sessions) = setup(1);
        schedule(&mut timers, &mut sessions, 1, ms(t0, 5));
        timers.advance(ms(t0, 10));
        schedule(&mut timers, &mut sessions, 1, ms(t0, 10));
        assert_eq!(expired(&mut timers, &mut sessions, ms(t0, 10)), [1]);
    }

    #[test]
    fn sessions_that_are_gone_are_skipped() {
        let (t0, mut timers, mut sessions) = setup(3);
        schedule(&mut timers, &mut sessions, 1, t0);
        schedule(&mut timers, &mut sessions, 2, ms(t0, 5));
        schedule(&mut timers, &mut sessions, 3, ms(t0, 6));
        sessions.remove(&SessionKey(1));
        sessions.remove(&SessionKey(2));
        assert_eq!(expired(&mut timers, &mut sessions, ms(t0, 10)), [3]);
        assert_eq!(timers.next_wake(), None);
    }
}
