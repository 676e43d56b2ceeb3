//! The control plane's view of sessions and publications, touched at request rate only.
//!
//! Invariant: every lookup is scoped by app: a session or track of another app is
//! reported exactly like one that does not exist.

use std::collections::HashMap;

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
}

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

/// Sessions by Calls id and publications by (session id, track name).
#[derive(Debug, Default)]
pub struct Registry {
    sessions: HashMap<String, SessionEntry>,
    ids: HashMap<SessionKey, String>,
    publications: HashMap<(String, String), PublicationEntry>,
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
}

impl Registry {
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

    /// The media plane closed a session: its publications go, the id answers 410.
    pub fn session_closed(&mut self, key: SessionKey, reason: CloseReason) {
        let Some(id) = self.ids.get(&key).cloned() else {
            return;
        };
        if let Some(e) = self.sessions.get_mut(&id) {
            e.closed = Some(reason);
        }
        self.publications.retain(|(sid, _), _| *sid != id);
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
