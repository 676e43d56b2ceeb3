//! A str0m DTLS provider that builds dimpl's configuration once per process.
//!
//! str0m's stock aws-lc-rs provider calls `dimpl::Config::builder().build()` for every
//! `Rtc`, and that build self-tests the whole crypto provider (key exchanges, signature
//! verification, AEAD vectors): about 0.9 ms of the ~1 ms an `Rtc` costs to build. A
//! `dimpl::Config` is immutable and dimpl takes it as an `Arc`, so we validate once, keep
//! the config, and hand every new DTLS endpoint a clone of the `Arc`. Certificates, SRTP and
//! hashing stay with str0m's default provider.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::srtp::Exported;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::{CryptoError, CryptoProvider};

/// str0m's default crypto provider with [`SharedConfigDtls`] as its DTLS part. Our str0m
/// clients (testkit, bench) use it too, so a test or load peer is as cheap to build.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            static DTLS: SharedConfigDtls = SharedConfigDtls {
                configs: Mutex::new(Vec::new()),
            };
            let mut provider = str0m::crypto::from_feature_flags();
            provider.dtls_provider = &DTLS;
            Arc::new(provider)
        })
        .clone()
}

/// Where a DTLS endpoint puts the SRTP keying material it exports (set once, after the
/// handshake).
pub(crate) type KeySlot = Arc<OnceLock<Exported>>;

thread_local! {
    /// The slot the next endpoint built on this thread fills: `Peer::new` sets it around
    /// `RtcConfig::build`, which builds the endpoint synchronously. Peers built without it
    /// (our str0m clients) export nothing.
    static NEXT_SLOT: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// Runs `build` with `slot` handed to the DTLS endpoint it creates.
pub(crate) fn with_key_slot<T>(slot: &KeySlot, build: impl FnOnce() -> T) -> T {
    NEXT_SLOT.with(|s| *s.borrow_mut() = Some(slot.clone()));
    let out = build();
    NEXT_SLOT.with(|s| s.borrow_mut().take());
    out
}

/// Builds DTLS endpoints from configs built (and validated) once per MTU.
#[derive(Debug)]
struct SharedConfigDtls {
    /// One entry per MTU str0m asked for; in practice a single one.
    configs: Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>>,
}

impl SharedConfigDtls {
    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        // A poisoned lock only means another thread panicked while pushing; the list is
        // still a valid cache.
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, config)) = configs.iter().find(|(m, _)| *m == mtu) {
            return Ok(config.clone());
        }
        let config = Arc::new(build_config(mtu)?);
        configs.push((mtu, config.clone()));
        Ok(config)
    }
}

/// The same settings str0m's aws-lc-rs provider uses.
fn build_config(mtu: Option<usize>) -> Result<dimpl::Config, CryptoError> {
    // ICE has proven return routability before DTLS starts, so server cookies add nothing.
    let mut builder = dimpl::Config::builder()
        .use_server_cookie(false)
        .with_crypto_provider(dimpl::crypto::aws_lc_rs::default_provider());
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    builder
        .build()
        .map_err(|e| CryptoError::Other(format!("dimpl config creation failed: {e}")))
}

impl DtlsProvider for SharedConfigDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let cert = cert.clone();
        let dtls = match version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            #[allow(unreachable_patterns)]
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version: {other}"
                )))
            }
        };
        let slot = NEXT_SLOT.with(|s| s.borrow_mut().take());
        Ok(Box::new(Endpoint(dtls, slot)))
    }
}

/// One DTLS endpoint; forwards to dimpl, and copies the SRTP keying material into its slot.
struct Endpoint(dimpl::Dtls, Option<KeySlot>);

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Endpoint")
    }
}

impl DtlsInstance for Endpoint {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let out = self.0.poll_output(buf);
        if let (DtlsOutput::KeyingMaterial(material, profile), Some(slot)) = (&out, &self.1) {
            let _ = slot.set(Exported {
                material: material.to_vec(),
                profile: *profile,
                active: self.0.is_active(),
            });
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_built_once_per_mtu() {
        let dtls = SharedConfigDtls {
            configs: Mutex::new(Vec::new()),
        };
        let a = dtls.config(Some(1150)).expect("config");
        let b = dtls.config(Some(1150)).expect("config");
        let c = dtls.config(None).expect("config");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(dtls.configs.lock().expect("lock").len(), 2);
    }

    #[test]
    fn provider_keeps_str0m_defaults_for_everything_but_dtls() {
        let ours = crypto_provider();
        let stock = str0m::crypto::from_feature_flags();
        assert_eq!(
            ours.sha256_provider.sha256(b"x"),
            stock.sha256_provider.sha256(b"x")
        );
        assert!(ours.dtls_provider.generate_certificate().is_some());
    }
}
