use super::*;

#[test]
fn reload_drains_and_undrains_by_weight() {
    let old = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&old);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let mut drained = old.clone();
    drained.vips[0].backends[1].weight = 0;
    let start = dp.calls.len();
    let change = reload(&mut balancer, &mut dp, &old, &drained);
    assert_eq!(change.rings_published, 1);
    assert!(!dp.calls_since(start).iter().any(|c| matches!(c, Call::SetBackend { .. })), "stays UP");
    assert_eq!(ring_members(&dp, &key), [1, 3]);
    assert_eq!(balancer.backend(2).map(|b| b.weight), Some(0));
    reload(&mut balancer, &mut dp, &drained, &old);
    assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
    // The same config again writes nothing.
    assert!(reload(&mut balancer, &mut dp, &old, &old).is_empty());
}

#[test]
fn reload_flips_backup_flags() {
    let old = primaries_and_a_backup();
    let (mut balancer, mut dp) = installed(&old);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let mut new = old.clone();
    new.vips[0].backends[0].backup = true;
    new.vips[0].backends[1].backup = true;
    new.vips[0].backends[2].backup = false;
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(ring_members(&dp, &key), [3], "the old backup is the only primary now");
    assert_eq!(state_of(&dp, 1), Some(BACKEND_STATE_UP), "flows pinned to 1 continue");
}

#[test]
fn reload_adds_and_removes_backends_without_reusing_ids() {
    let old = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&old);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let mut new = old.clone();
    let removed = new.vips[0].backends.remove(1);
    new.vips[0].backends.push(BackendConfig {
        address: addr("198.18.2.20:8080"),
        weight: 1,
        backup: false,
        health_check: None,
    });
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(ring_members(&dp, &key), [1, 3, 4]);
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN), "pinned flows move at their next packet");
    assert_eq!(state_of(&dp, 4), Some(BACKEND_STATE_UP));
    assert_eq!(
        ids_of(&balancer, 1),
        [(1, "198.18.2.10:8080".to_owned()), (3, "198.18.2.12:8080".to_owned()), (4, "198.18.2.20:8080".to_owned())]
    );
    assert!(balancer.backends().all(|b| b.backend_id != 2));
    // A late verdict for the removed backend changes nothing.
    let start = dp.calls.len();
    assert!(set(&mut balancer, &mut dp, 2, true).is_empty());
    assert_eq!(dp.calls.len(), start);
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN));
    assert!(balancer.set_weight(2, 1, &mut dp).is_err());

    // Adding the same address back gives it a new id, never 2.
    let mut again = new.clone();
    again.vips[0].backends.push(removed);
    reload(&mut balancer, &mut dp, &new, &again);
    assert_eq!(ring_members(&dp, &key), [1, 3, 4, 5]);
    assert_eq!(balancer.backend(5).map(|b| b.address), Some(addr("198.18.2.11:8080")));
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN));
}

#[test]
fn reload_health_checks_decide_the_health_of_new_backends() {
    let mut checked = equal_vip(2);
    checked.health_check.kind = HealthCheckKind::Tcp;
    let old = config(SMALL_M, vec![checked]);
    let (mut balancer, mut dp) = installed(&old);
    set(&mut balancer, &mut dp, 1, true);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let mut new = old.clone();
    new.vips[0].backends.push(BackendConfig {
        address: addr("198.18.2.20:8080"),
        weight: 1,
        backup: false,
        health_check: None,
    });
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(balancer.backend(3).map(|b| b.health), Some(Health::Unknown), "unchecked yet");
    assert_eq!(ring_members(&dp, &key), [1]);
    // Dropping the checks brings everyone up.
    let mut unchecked = new.clone();
    unchecked.vips[0].health_check.kind = HealthCheckKind::None;
    reload(&mut balancer, &mut dp, &new, &unchecked);
    assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
    assert_eq!(balancer.vip(1).map(|v| v.health_check.kind.clone()), Some(HealthCheckKind::None));
}

#[test]
fn reload_actions_for_unknown_services_are_refused_without_writes() {
    let old = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&old);
    let start = dp.calls.len();
    let bad = [
        Action::SetWeight { vip: "nope".into(), address: addr("198.18.2.10:8080"), from: 1, to: 0 },
        Action::RemoveBackend { vip: "web".into(), address: addr("198.18.2.99:8080") },
        Action::AddBackend {
            vip: "web".into(),
            backend: BackendConfig { address: addr("198.18.2.10:8080"), weight: 1, backup: false, health_check: None },
        },
    ];
    for action in bad {
        // A valid action first: it must not be applied either.
        let drain = Action::SetWeight { vip: "web".into(), address: addr("198.18.2.11:8080"), from: 1, to: 0 };
        let result = balancer.apply_reload(&[drain, action.clone()], &mut dp);
        assert!(matches!(result, Err(StateError::NotRunning { .. } | StateError::AlreadyRunning { .. })), "{action:?}");
        assert!(result.is_err_and(|e| e.changed_nothing()));
    }
    assert_eq!(dp.calls.len(), start);
    assert_eq!(balancer.backend(2).map(|b| b.weight), Some(1));
}

#[test]
fn reload_sets_changes_and_removes_limits_without_touching_rings() {
    use crate::config::model::{Cidr, LimitAction, LimitsConfig};
    use lb_common::vip::VIP_F_LIMITED;

    let old = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&old);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(dp.vips.get(&key).map(|v| v.flags & VIP_F_LIMITED), Some(0));
    let allow = |a: &str, n: u8| Cidr { addr: a.parse().expect("ip"), prefix_len: n };
    let limits = LimitsConfig {
        rate: Some(100),
        burst: 200,
        max_connections: Some(50),
        prefix_len: 24,
        action: LimitAction::Drop,
        allow: vec![allow("198.18.9.0", 24)],
    };
    let mut limited = old.clone();
    limited.vips[0].limits = Some(limits.clone());
    let slots_before = dp.calls.iter().filter(|c| matches!(c, Call::WriteSlots { .. })).count();
    reload(&mut balancer, &mut dp, &old, &limited);
    // The checker in FakeDataplane saw the limits written before the flag.
    assert_eq!(dp.vips.get(&key).map(|v| v.flags & VIP_F_LIMITED), Some(VIP_F_LIMITED));
    assert_eq!(dp.limits.get(&1).map(|l| l.max_connections), Some(50));
    assert!(dp.allow.contains(&(1, allow("198.18.9.0", 24))));

    let mut changed = limited.clone();
    if let Some(l) = changed.vips[0].limits.as_mut() {
        l.rate = Some(10);
        l.allow = vec![allow("198.18.10.0", 24)];
    }
    reload(&mut balancer, &mut dp, &limited, &changed);
    assert_eq!(dp.limits.get(&1).map(|l| l.interval_ns), Some(100_000_000));
    assert_eq!(dp.allow.iter().copied().collect::<Vec<_>>(), vec![(1, allow("198.18.10.0", 24))]);

    reload(&mut balancer, &mut dp, &changed, &old);
    assert_eq!(dp.vips.get(&key).map(|v| v.flags & VIP_F_LIMITED), Some(0));
    // Limits alone never rewrite a ring.
    let slots_after = dp.calls.iter().filter(|c| matches!(c, Call::WriteSlots { .. })).count();
    assert_eq!(slots_before, slots_after);
    assert_consistent(&balancer, &dp);
}

#[test]
fn a_backends_own_check_decides_its_start_and_survives_the_vips_check_going_none() {
    // The VIP probes over TCP; backend 2 has `type = "none"` of its own, so
    // it starts up while backend 1 waits for its first probe.
    let mut vip = equal_vip(2);
    vip.health_check.kind = HealthCheckKind::Tcp;
    let mut own = vip.health_check.clone();
    own.kind = HealthCheckKind::None;
    vip.backends[1].health_check = Some(own);
    let old = config(SMALL_M, vec![vip]);
    let (mut balancer, mut dp) = installed(&old);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(balancer.backend(1).map(|b| b.health), Some(Health::Unknown));
    assert_eq!(balancer.backend(2).map(|b| b.health), Some(Health::Up));
    assert_eq!(balancer.backend_check(1), None, "follows its VIP's");
    assert_eq!(balancer.backend_check(2).map(|c| c.kind.clone()), Some(HealthCheckKind::None));
    assert_eq!(ring_members(&dp, &key), [2]);
    // Backend 2 gets a TCP check of its own: it keeps its health until probed.
    let mut new = old.clone();
    let mut tcp = new.vips[0].health_check.clone();
    tcp.port = Some(9000);
    new.vips[0].backends[1].health_check = Some(tcp.clone());
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(balancer.backend_check(2), Some(&tcp));
    assert_eq!(balancer.backend(2).map(|b| b.health), Some(Health::Up));
    // The VIP's check becomes `none`: backend 1 comes up; backend 2 keeps
    // its own check (and its health).
    let mut unchecked = new.clone();
    unchecked.vips[0].health_check.kind = HealthCheckKind::None;
    set(&mut balancer, &mut dp, 2, false);
    reload(&mut balancer, &mut dp, &new, &unchecked);
    assert_eq!(balancer.backend(1).map(|b| b.health), Some(Health::Up));
    assert_eq!(balancer.backend(2).map(|b| b.health), Some(Health::Down), "still probed by its own check");
    assert_eq!(ring_members(&dp, &key), [1]);
}
