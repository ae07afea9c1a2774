//! The agent that runs on each compute host (and, with `--role storage`, on each storage host):
//! registers with the manager, and every heartbeat reports what runs here and receives what
//! should. The agent pulls its assignments (level-triggered): a lost heartbeat, a manager
//! restart or a change of leader only delays the next reconciliation, never loses an order.

pub mod compute;
pub mod monitor;
pub mod storage;

use std::time::Duration;

use vnode_manager_client::heartbeat::Beater;
use vnode_manager_client::types::Heartbeat;

/// What runs on this host.
pub enum Role {
    Compute(compute::Compute),
    Storage(storage::Storage),
}

/// Beats forever: report, send, apply the reply, sleep the interval the manager asked for.
pub fn run(mut beater: Beater, mut role: Role) -> ! {
    loop {
        let hb = match &mut role {
            Role::Compute(c) => Heartbeat {
                vnodes: c.report(),
                ..Default::default()
            },
            Role::Storage(s) => {
                let (used, exports) = s.report();
                Heartbeat {
                    used: Some(used),
                    exports,
                    ..Default::default()
                }
            }
        };
        let mut wait = Duration::from_secs(1);
        if let Ok(reply) = beater.beat(&hb) {
            wait = Duration::from_millis(reply.interval_ms.clamp(50, 10_000));
            match &mut role {
                Role::Compute(c) => {
                    c.acknowledge(&hb.vnodes);
                    c.apply(&reply.run);
                }
                Role::Storage(s) => s.apply(&reply.exports),
            }
        }
        std::thread::sleep(wait);
    }
}
