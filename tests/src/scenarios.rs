//! End-to-end scenarios that run the same way over either address family:
//! the family is the VIP they are given. Test bodies: they panic with a
//! message on failure.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    Spread, Testbed,
    agent::{Agent, HealthCheck},
    testbed::client::HttpConn,
};

/// With the agent running on `testbed` with default health checks and all
/// backends of the TCP VIP `vip` (listening on `addr`) up: a backend that
/// dies takes no new connections once the detection bound has passed, an
/// established connection to another backend survives, and the dead one
/// takes new connections again after its `rise` successes.
///
/// # Panics
///
/// On any of those not holding.
pub fn dead_backend_gets_no_new_connections_and_comes_back(
    agent: &mut Agent,
    testbed: &Testbed,
    vip: &str,
    addr: SocketAddr,
) {
    let check = HealthCheck::default();
    let backends = testbed.backend_count();
    let spread = |n| Spread::of(&testbed.client_requests(addr, n, true));

    // An established connection to a backend that stays healthy must survive.
    let mut kept = testbed
        .client()
        .enter(|| HttpConn::connect(addr))
        .expect("entering the client namespace")
        .unwrap_or_else(|e| panic!("connecting to the VIP {addr}: {e}"));
    let kept_backend = kept.get("/", true).expect("first request").backend().expect("backend name");
    let victim = if kept_backend == testbed.backend_name(2) { 3 } else { 2 };
    let victim_name = testbed.backend_name(victim);

    testbed.stop_backend(victim).expect("stopping a backend");
    let killed = Instant::now();
    let bound = check.detection_bound() + Duration::from_secs(1);

    // New connections until the bound has passed: failures (resets from the
    // dead backend's kernel) may happen only within the bound.
    let mut last_failure = None;
    let mut answered = BTreeSet::new();
    while killed.elapsed() < bound + Duration::from_secs(1) {
        for result in testbed.client_requests(addr, 10, true) {
            match result {
                Ok(name) => {
                    assert_ne!(name, victim_name, "a dead backend cannot answer");
                    answered.insert(name);
                }
                Err(_) => last_failure = Some(killed.elapsed()),
            }
        }
    }
    if let Some(at) = last_failure {
        assert!(
            at <= bound,
            "a new connection to {addr} failed {at:?} after the kill; bound {bound:?}\n{}",
            agent.log()
        );
    }
    assert_eq!(answered.len(), backends - 1, "the others keep answering: {answered:?}");
    let mut want = vec!["up"; backends];
    want[victim - 1] = "down";
    agent.wait_health(vip, &want, Duration::ZERO).expect("marked down by now");

    let after = spread(150);
    assert_eq!(after.ok(), 150, "all new connections to {addr} served: {after:?}");
    assert_eq!(after.count(&victim_name), 0, "{after:?}");
    let same = kept.get("/", true).expect("the kept connection still works");
    assert_eq!(same.backend().as_deref(), Some(kept_backend.as_str()), "it did not move");

    testbed.start_backend(victim).expect("restarting the backend");
    let took = agent
        .wait_health(vip, &vec!["up"; backends], check.recovery_bound() + Duration::from_secs(1))
        .expect("back up after rise successes");
    eprintln!("backend {victim} of {addr} up again {took:?} after its restart");
    let back = spread(150);
    assert_eq!(back.ok(), 150, "{back:?}");
    assert!(back.count(&victim_name) >= 20, "it takes new connections to {addr} again: {back:?}");
}
