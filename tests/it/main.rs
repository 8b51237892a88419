//! The integration tests, one binary: real tollgate processes on loopback (and in network
//! namespaces for failover) against real upstreams, a real Consul agent, Pebble, Redis,
//! gRPC, dnsmasq. One binary so the crate is linked once and the harness (`common`, the
//! testkit crate) compiled once; a module per area. Run one area with `cargo test --test it acme::`.

// the harness is the `tollgate-testkit` crate (testkit/), shared with benches/failover.rs
use tollgate_testkit as common;

mod acme;
mod admin;
mod backends;
mod check;
mod consul;
mod consul_faults;
mod failover;
mod leg;
mod limits;
mod paths;
mod plugins;
mod ports;
mod proxy;
mod reload;
