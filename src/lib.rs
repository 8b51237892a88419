//! tollgate: an HTTPS edge reverse proxy on pingora. See docs/ARCHITECTURE.md for the picture:
//! config → state (Snapshot via ArcSwap) → proxy, with routing, upstream and tls as the pure
//! or near-pure pieces the request path consults.

pub mod acme;
pub mod admin;
pub mod alloc;
pub mod clock;
pub mod config;
pub mod consul;
pub mod discovery;
pub mod failover;
pub mod limits;
pub mod metrics;
pub mod ports;
pub mod probe;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod wasm;
