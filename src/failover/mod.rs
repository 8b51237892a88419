//! The active/standby failover peer. Owns: the pure state machine (`machine`), the UDP
//! heartbeats (`heartbeat`, `peer`), the claim actions (`claim`: vip, aws_eip, exec) and the
//! optional Consul-lock fencing (`consul::Lock`). The machine is pure: events in, actions out, time
//! passed in, so election, split brain and backoff are tested exactly. It must not touch
//! sockets or addresses itself: the I/O edge (`peer`) performs its actions.

pub mod claim;
pub mod heartbeat;
pub mod machine;
pub mod peer;
