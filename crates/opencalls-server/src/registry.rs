//! The control plane's view of sessions and publications, touched at request rate only.
//!
//! Invariant: every lookup is scoped by app: a session or track of another app is
//! reported exactly like one that does not exist.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use opencalls_sfu::{CloseReason, Kind, SessionKey, TrackKey, WorkerIndex};

/// A Calls session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// Owning app.
    pub app: String,
    /// Media-plane key.
    pub key: SessionKey,
    /// Owning worker.
    pub worker: WorkerIndex,
    /// Set once the media plane closed it.
    pub closed: Option<CloseReason>,
    /// Requests this session may still make now (Calls: 50 per second per session).
    pub tokens: f64,
    /// When `tokens` was last refilled.
    pub refilled: Option<Instant>,
}

/// Calls' documented limit: 50 API requests per second per session.
pub const REQUESTS_PER_SECOND: f64 = 50.0;

/// A published track.
#[derive(Debug, Clone, Copy)]
pub struct PublicationEntry {
    /// Media-plane key.
    pub key: TrackKey,
    /// Worker of the publisher.
    pub worker: WorkerIndex,
    /// Audio or video.
    pub kind: Kind,
}

/// How long a closed session keeps answering 410 before it is forgotten (404).
pub const CLOSED_SESSION_TTL: Duration = Duration::from_secs(600);

/// Sessions by Calls id and publications by (session id, track name).
#[derive(Debug, Default)]
pub struct Registry {
    sessions: HashMap<String, SessionEntry>,
    ids: HashMap<SessionKey, String>,
    publications: HashMap<(String, String), PublicationEntry>,
    /// Closed sessions, oldest first, so forgetting them never scans the open ones.
    closed: VecDeque<(Instant, SessionKey)>,
}

/// How a session lookup ended.
#[derive(Debug)]
pub enum Lookup {
    /// Open.
    Open(SessionEntry),
    /// Closed by the media plane.
    Closed,
    /// Unknown (or another app's).
    Unknown,
    /// Over the per-session request rate.
    Limited,
}

impl Registry {
    /// Finds `id` for `app` and charges one request to its rate budget (a token bucket of
    /// [`REQUESTS_PER_SECOND`] per second, burst of the same size).
    pub fn admit(&mut self, app: &str, id: &str, now: Instant) -> Lookup {
        let Some(e) = self.sessions.get_mut(id).filter(|e| e.app == app) else {
            return Lookup::Unknown;
        };
        if e.closed.is_some() {
            return Lookup::Closed;
        }
        let elapsed = e
            .refilled
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(1.0);
        e.tokens = (e.tokens + elapsed * REQUESTS_PER_SECOND).min(REQUESTS_PER_SECOND);
        e.refilled = Some(now);
        if e.tokens < 1.0 {
            return Lookup::Limited;
        }
        e.tokens -= 1.0;
        Lookup::Open(e.clone())
    }

    /// Adds a new session.
    pub fn insert_session(&mut self, id: String, entry: SessionEntry) {
        self.ids.insert(entry.key, id.clone());
        self.sessions.insert(id, entry);
    }

    /// Finds `id` for `app`.
    pub fn session(&self, app: &str, id: &str) -> Lookup {
        match self.sessions.get(id) {
            Some(e) if e.app == app => match e.closed {
                None => Lookup::Open(e.clone()),
                Some(_) => Lookup::Closed,
            },
            _ => Lookup::Unknown,
        }
    }

    /// Records a publication.
    pub fn publish(&mut self, session_id: &str, track_name: &str, entry: PublicationEntry) {
        self.publications
            .insert((session_id.to_string(), track_name.to_string()), entry);
    }

    /// Forgets a publication.
    pub fn unpublish(&mut self, session_id: &str, track_name: &str) {
        self.publications
            .remove(&(session_id.to_string(), track_name.to_string()));
    }

    /// Finds a publication of `app`.
    pub fn publication(
        &self,
        app: &str,
        session_id: &str,
        track_name: &str,
    ) -> Option<PublicationEntry> {
        let s = self.sessions.get(session_id)?;
        if s.app != app || s.closed.is_some() {
            return None;
        }
        self.publications
            .get(&(session_id.to_string(), track_name.to_string()))
            .copied()
    }

    /// The media plane closed a session: its publications go, the id answers 410 for
    /// [`CLOSED_SESSION_TTL`], then is forgotten.
    pub fn session_closed(&mut self, key: SessionKey, reason: CloseReason, now: Instant) {
        let Some(id) = self.ids.get(&key).cloned() else {
            return;
        };
        if let Some(e) = self.sessions.get_mut(&id) {
            e.closed = Some(reason);
        }
        self.publications.retain(|(sid, _), _| *sid != id);
        self.closed.push_back((now, key));
        while let Some((at, old)) = self.closed.front().copied() {
            if now.saturating_duration_since(at) < CLOSED_SESSION_TTL {
                break;
            }
            self.closed.pop_front();
            if let Some(old_id) = self.ids.remove(&old) {
                self.sessions.remove(&old_id);
            }
        }
    }

    /// Number of sessions remembered, open or closed.
    pub fn remembered_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The media plane closed one publication.
    pub fn publication_closed(&mut self, key: SessionKey, track_name: &str) {
        if let Some(id) = self.ids.get(&key).cloned() {
            self.unpublish(&id, track_name);
        }
    }

    /// Number of open sessions.
    pub fn open_sessions(&self) -> usize {
        self.sessions
            .values()
            .filter(|e| e.closed.is_none())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: u64) -> SessionEntry {
        SessionEntry {
            app: "a".into(),
            key: SessionKey(key),
            worker: 0,
            closed: None,
            tokens: REQUESTS_PER_SECOND,
            refilled: None,
        }
    }

    #[test]
    fn fifty_requests_per_second_per_session() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.insert_session("s1".into(), entry(1));
        r.insert_session("s2".into(), entry(2));
        for _ in 0..50 {
            assert!(matches!(r.admit("a", "s1", t0), Lookup::Open(_)));
        }
        assert!(matches!(r.admit("a", "s1", t0), Lookup::Limited));
        assert!(
            matches!(r.admit("a", "s2", t0), Lookup::Open(_)),
            "other sessions unaffected"
        );
        assert!(matches!(
            r.admit("a", "s1", t0 + Duration::from_millis(100)),
            Lookup::Open(_)
        ));
        assert!(matches!(r.admit("b", "s1", t0), Lookup::Unknown));
    }

    #[test]
    fn closed_sessions_answer_gone_then_are_forgotten() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.insert_session("s1".into(), entry(1));
        r.insert_session("s2".into(), entry(2));
        r.publish(
            "s1",
            "t",
            PublicationEntry {
                key: TrackKey(9),
                worker: 0,
                kind: Kind::Audio,
            },
        );
        r.session_closed(SessionKey(1), CloseReason::Disconnected, t0);
        assert!(matches!(r.session("a", "s1"), Lookup::Closed));
        assert!(r.publication("a", "s1", "t").is_none());
        assert!(
            matches!(r.session("b", "s2"), Lookup::Unknown),
            "other app sees nothing"
        );
        // Much later, another close sweeps the first one out; open sessions stay.
        r.session_closed(
            SessionKey(2),
            CloseReason::Disconnected,
            t0 + CLOSED_SESSION_TTL + Duration::from_secs(1),
        );
        assert!(matches!(r.session("a", "s1"), Lookup::Unknown));
        assert!(matches!(r.session("a", "s2"), Lookup::Closed));
        assert_eq!(r.remembered_sessions(), 1);
    }
}
