//! In-process integration tests: the real server (HTTP API + media workers) on loopback,
//! driven by str0m client peers over real UDP. One binary, one module per area.

mod support;

mod close;
mod errors;
mod hostile;
mod lifecycle;
mod media;
mod publish;
