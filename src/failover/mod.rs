//! The active/standby failover peer. Owns: the pure state machine (`machine`), and (to come)
//! the UDP heartbeats and the claim actions (vip, aws_eip, exec). The machine is pure: events
//! in, actions out, time passed in, so election, split brain and backoff are tested exactly.
//! It must not touch sockets or addresses itself: the I/O edge performs its actions.

pub mod heartbeat;
pub mod machine;
pub mod peer;
