//! The claim actions a MASTER runs, in config order, each with its own timeout and retries:
//! `vip` (a local address, announced), `aws_eip` (an elastic IP moved by the EC2 API) and
//! `exec` (a hook told the new state). After a claim every action that can be checked is
//! verified, and the MASTER re-verifies periodically (`Action::Verify`).

pub mod aws;
pub mod vip;

use crate::config::{ClaimAction, FailoverSettings, Vip};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

enum Runner {
    Exec { command: Vec<String> },
    Vip(Vip),
    Eip(aws::Eip),
}

struct Step {
    runner: Runner,
    timeout: Duration,
    retries: u32,
}

/// Every claim action of this node.
pub struct Claims {
    name: String,
    steps: Vec<Step>,
}

/// Run `f` up to `1 + retries` times, each bounded by `timeout`; the last error if none worked.
async fn attempts<T, F, Fut>(
    what: &str,
    timeout: Duration,
    retries: u32,
    mut f: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for attempt in 0..=retries {
        match tokio::time::timeout(timeout, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("timed out after {} ms", timeout.as_millis()),
        }
        tracing::warn!(action = what, attempt, error = %last, "failover action failed");
        if attempt < retries {
            tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
        }
    }
    Err(format!("{what}: {last}"))
}

async fn exec(command: &[String], name: &str, state: &str, term: u64) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("TOLLGATE_STATE", state)
        .env("TOLLGATE_TERM", term.to_string())
        .env("TOLLGATE_NAME", name)
        .kill_on_drop(true);
    match cmd.status().await {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!("{command:?} exited with {st}")),
        Err(e) => Err(format!("{command:?} could not run: {e}")),
    }
}

impl Claims {
    pub fn new(s: &FailoverSettings) -> Arc<Claims> {
        let steps = s
            .claims
            .iter()
            .map(|c| Step {
                timeout: c.timeout,
                retries: c.retries,
                runner: match c.action.clone() {
                    ClaimAction::Exec { command } => Runner::Exec { command },
                    ClaimAction::Vip(v) => Runner::Vip(v),
                    ClaimAction::AwsEip(e) => Runner::Eip(aws::Eip::new(e)),
                },
            })
            .collect();
        Arc::new(Claims {
            name: s.name.clone(),
            steps,
        })
    }

    /// Take the address: every action in order, then verify what can be verified. The first
    /// failure stops the claim (the machine demotes and backs off).
    pub async fn claim(self: &Arc<Self>, term: u64) -> Result<(), String> {
        for step in &self.steps {
            let (t, r) = (step.timeout, step.retries);
            match &step.runner {
                Runner::Exec { command } => {
                    attempts("exec", t, r, || exec(command, &self.name, "MASTER", term)).await?
                }
                Runner::Vip(v) => {
                    attempts("vip", t, r, || {
                        vip::add(&v.interface, v.address, v.prefix, v.garp_count)
                    })
                    .await?;
                    // a second burst a little later, for neighbours that missed or rate-limited
                    // the first; only while we still hold the address
                    if v.garp_repeat.is_zero() {
                        continue;
                    }
                    let (me, v) = (self.clone(), v.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(v.garp_repeat).await;
                        if matches!(vip::holds(&v.interface, v.address).await, Ok(true)) {
                            let r = vip::announce_by_name(&v.interface, v.address, v.garp_count);
                            if let Err(e) = r.await {
                                tracing::warn!(name = %me.name, error = %e, "failover: second announcement failed");
                            }
                        }
                    });
                }
                Runner::Eip(e) => attempts("aws_eip", t, r, || e.associate()).await?,
            }
        }
        self.verify().await
    }

    /// Check that every verifiable action still holds: the address is on the interface, the
    /// elastic IP is associated here. (A hook cannot be checked generically.)
    pub async fn verify(&self) -> Result<(), String> {
        for step in &self.steps {
            let (t, r) = (step.timeout, step.retries);
            match &step.runner {
                Runner::Exec { .. } => {}
                Runner::Vip(v) => {
                    attempts("vip verify", t, r, || async {
                        match vip::holds(&v.interface, v.address).await? {
                            true => Ok(()),
                            false => Err(format!("{} is not on {}", v.address, v.interface)),
                        }
                    })
                    .await?
                }
                // EC2 is eventually consistent: DescribeAddresses may show the old holder for a
                // moment after AssociateAddress, so a negative answer is asked again until the
                // step's timeout has passed
                Runner::Eip(e) => {
                    let patience = tokio::time::Instant::now() + t;
                    loop {
                        if attempts("aws_eip verify", t, r, || e.holds()).await? {
                            break;
                        }
                        if tokio::time::Instant::now() >= patience {
                            return Err(format!(
                                "DescribeAddresses shows {} on another instance",
                                e.s.allocation_id
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Give the address up (leaving MASTER for `state`), in reverse order.
    pub async fn release(&self, state: &str, term: u64) -> Result<(), String> {
        let mut result = Ok(());
        for step in self.steps.iter().rev() {
            let (t, r) = (step.timeout, step.retries);
            let res = match &step.runner {
                Runner::Exec { command } => {
                    attempts("exec", t, r, || exec(command, &self.name, state, term)).await
                }
                Runner::Vip(v) => {
                    attempts("vip release", t, r, || vip::del(&v.interface, v.address)).await
                }
                Runner::Eip(_) => Ok(()),
            };
            if let Err(e) = res {
                result = Err(e);
            }
        }
        result
    }

    /// At start (INIT): drop a floating address a crashed run of ours may have left behind,
    /// so a returning node never answers for an address it has not claimed.
    pub async fn clear_stale(&self) {
        for step in &self.steps {
            if let Runner::Vip(Vip {
                address, interface, ..
            }) = &step.runner
            {
                match vip::holds(interface, *address).await {
                    Ok(true) => {
                        tracing::warn!(%address, %interface, "failover: removing a floating address left from an earlier run");
                        if let Err(e) = vip::del(interface, *address).await {
                            tracing::error!(error = %e, "failover: cannot remove the stale floating address");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "failover: cannot check the floating address")
                    }
                }
            }
        }
    }
}
