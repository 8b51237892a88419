//! Consul, as every part of tollgate reaches it: the HTTP client (the agent's address, TLS
//! roots, the ACL token read at every request so a rotated `token_file` reaches every user
//! at once), blocking reads with Consul's index rules (`client`), the key/value store
//! (`kv`), values sealed with a fleet's secret (`sealed`), and sessions with the locks built
//! on them (`lock`). Discovery's watches, the failover peer's fencing lock, ACME's shared
//! state and issuer lock and the session ticket keys all go through here (Fabio's one
//! client behind a narrow interface). Must not know what its users keep
//! in Consul, nor import anything but `config`.

pub(crate) mod client;
mod kv;
mod lock;
mod sealed;

pub use client::next_index;
pub(crate) use kv::kv_entries;
pub use kv::Consul;
pub use lock::Lock;
pub use sealed::Sealer;
