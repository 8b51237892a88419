//! The integration tests, one binary: real tollgate processes on loopback (and in network
//! namespaces for failover) against real upstreams, a real Consul agent, Pebble, Redis,
//! gRPC, dnsmasq. One binary so the crate and the harness (`common`) are compiled and
//! linked once; a module per area. Run one area with `cargo test --test it acme::`.

mod common;

mod acme;
mod admin;
mod backends;
mod check;
mod consul;
mod consul_faults;
mod failover;
mod limits;
mod paths;
mod plugins;
mod ports;
mod proxy;
mod reload;
