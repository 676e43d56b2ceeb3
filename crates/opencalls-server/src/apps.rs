//! Apps (id + secret): given on the command line, or one default app persisted locally.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// One app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct App {
    /// 32 lowercase hex characters, like Calls app ids.
    pub id: String,
    /// The bearer secret.
    pub secret: String,
}

/// The apps this server accepts.
#[derive(Debug, Clone, Default)]
pub struct AppStore {
    apps: HashMap<String, App>,
}

/// Whether a request may act for an app.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthResult {
    /// The secret matches.
    Allowed,
    /// No such app.
    UnknownApp,
    /// Missing or wrong secret.
    BadSecret,
}

impl AppStore {
    /// From `ID:SECRET` strings.
    pub fn from_specs(specs: &[String]) -> anyhow::Result<AppStore> {
        let mut apps = HashMap::new();
        for spec in specs {
            let (id, secret) = spec
                .split_once(':')
                .filter(|(i, s)| !i.is_empty() && !s.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--app wants ID:SECRET, got {spec:?}"))?;
            apps.insert(
                id.to_string(),
                App {
                    id: id.to_string(),
                    secret: secret.to_string(),
                },
            );
        }
        Ok(AppStore { apps })
    }

    /// Loads `apps.json` from `dir`, creating it with one fresh app if absent.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<AppStore> {
        let path = dir.join("apps.json");
        let list: Vec<App> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let app = App {
                    id: opencalls_sfu::random_hex(32),
                    secret: opencalls_sfu::random_hex(64),
                };
                std::fs::create_dir_all(dir)?;
                let list = vec![app];
                write_private(&path, &serde_json::to_vec_pretty(&list)?)?;
                list
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        anyhow::ensure!(!list.is_empty(), "{} lists no app", path.display());
        Ok(AppStore {
            apps: list.into_iter().map(|a| (a.id.clone(), a)).collect(),
        })
    }

    /// Every app, sorted by id.
    pub fn list(&self) -> Vec<&App> {
        let mut v: Vec<&App> = self.apps.values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Checks `Authorization: Bearer <secret>` for `app_id`, in constant time.
    pub fn authorize(&self, app_id: &str, authorization: Option<&str>) -> AuthResult {
        let Some(app) = self.apps.get(app_id) else {
            return AuthResult::UnknownApp;
        };
        let given = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(app.secret.as_bytes())) {
            AuthResult::Allowed
        } else {
            AuthResult::BadSecret
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(bytes)
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_checks_app_then_secret() {
        let s = AppStore::from_specs(&["a1:s3cret".into()]).unwrap();
        assert_eq!(
            s.authorize("nope", Some("Bearer s3cret")),
            AuthResult::UnknownApp
        );
        assert_eq!(s.authorize("a1", None), AuthResult::BadSecret);
        assert_eq!(
            s.authorize("a1", Some("Bearer s3cre")),
            AuthResult::BadSecret
        );
        assert_eq!(s.authorize("a1", Some("s3cret")), AuthResult::BadSecret);
        assert_eq!(
            s.authorize("a1", Some("Bearer s3cret")),
            AuthResult::Allowed
        );
    }

    #[test]
    fn bad_specs_rejected() {
        assert!(AppStore::from_specs(&["nocolon".into()]).is_err());
        assert!(AppStore::from_specs(&[":x".into()]).is_err());
    }

    #[test]
    fn default_app_persists() {
        let dir = std::env::temp_dir().join(format!("opencalls-apps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = AppStore::load_or_create(&dir).unwrap();
        let b = AppStore::load_or_create(&dir).unwrap();
        assert_eq!(a.list(), b.list());
        assert_eq!(a.list()[0].id.len(), 32);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
