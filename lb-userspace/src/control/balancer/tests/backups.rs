use super::*;

#[test]
fn backup_takes_over_when_the_last_primary_goes_down_and_hands_back() {
    let config = primaries_and_a_backup();
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(ring_members(&dp, &key), [1, 2], "backup idle");
    assert_eq!(state_of(&dp, 3), Some(BACKEND_STATE_UP), "an idle backup is still up");
    assert_eq!(balancer.backend(3).map(|b| (b.backup, b.ring_slots)), Some((true, 0)));

    set(&mut balancer, &mut dp, 1, false);
    assert_eq!(ring_members(&dp, &key), [2], "one primary left: still no backup");
    assert_consistent(&balancer, &dp);

    set(&mut balancer, &mut dp, 2, false);
    assert_eq!(ring_members(&dp, &key), [3], "the backup takes every slot");
    assert_eq!(balancer.backend(3).map(|b| b.ring_slots), Some(SMALL_M));
    assert_consistent(&balancer, &dp);

    set(&mut balancer, &mut dp, 2, true);
    assert_eq!(ring_members(&dp, &key), [2], "new flows go back to the primary");
    assert_eq!(state_of(&dp, 3), Some(BACKEND_STATE_UP), "flows pinned to the backup continue");
    assert_eq!(balancer.backend(3).map(|b| b.ring_slots), Some(0));
    assert_consistent(&balancer, &dp);
}

#[test]
fn with_everything_down_the_ring_is_empty_and_a_backup_refills_it() {
    let config = primaries_and_a_backup();
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    for id in [3, 1, 2] {
        set(&mut balancer, &mut dp, id, false);
    }
    assert_eq!(ring_members(&dp, &key), [BACKEND_ID_NONE]);
    set(&mut balancer, &mut dp, 3, true);
    assert_eq!(ring_members(&dp, &key), [3]);
    set(&mut balancer, &mut dp, 1, true);
    assert_eq!(ring_members(&dp, &key), [1]);
    assert_consistent(&balancer, &dp);
}

#[test]
fn drained_primaries_leave_new_flows_to_the_backups() {
    let config = config(
        SMALL_M,
        vec![with_backups(
            vip_config(
                "web",
                "198.18.0.10:80",
                &[("198.18.2.10:80", 0), ("198.18.2.11:80", 1), ("198.18.2.12:80", 3)],
                HealthCheckKind::None,
            ),
            &[1, 2],
        )],
    );
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(ring_members(&dp, &key), [2, 3], "the only primary is drained");
    assert_eq!(state_of(&dp, 1), Some(BACKEND_STATE_UP), "drained, not down");
    // The backups share by weight, like primaries.
    let share = balancer.backend(3).map_or(0.0, |b| f64::from(b.ring_slots)) / f64::from(SMALL_M);
    assert!((share - 0.75).abs() < 0.02, "weight-3 backup holds {share:.3}");
    assert_consistent(&balancer, &dp);

    let change = balancer.set_weight(1, 2, &mut dp).unwrap_or_else(|e| panic!("set_weight: {e}"));
    assert_eq!(change.rings_published, 1);
    assert_eq!(ring_members(&dp, &key), [1], "undrained primary takes over");
    assert_consistent(&balancer, &dp);
}

#[test]
fn set_weight_zero_drains_without_marking_down() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let start = dp.calls.len();
    let change = balancer.set_weight(2, 0, &mut dp).unwrap_or_else(|e| panic!("set_weight: {e}"));
    assert_eq!(change.backends_written, 0, "its entry stays UP, so its pinned flows continue");
    assert!(!dp.calls_since(start).iter().any(|c| matches!(c, Call::SetBackend { .. })));
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_UP));
    assert_eq!(ring_members(&dp, &key), [1, 3], "no new flows");
    assert_eq!(balancer.backend(2).map(|b| (b.weight, b.ring_slots)), Some((0, 0)));
    assert_consistent(&balancer, &dp);
    balancer.set_weight(2, 1, &mut dp).unwrap_or_else(|e| panic!("set_weight: {e}"));
    assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
    assert!(matches!(balancer.set_weight(9, 1, &mut dp), Err(StateError::UnknownBackend { backend_id: 9 })));
    assert_consistent(&balancer, &dp);
}

#[test]
fn readers_never_see_a_backend_that_is_not_up_with_backups_and_drains() {
    // Three primaries and two backups; a walk of health and weight changes.
    let addrs: Vec<String> = (0..5).map(|i| format!("198.18.2.{}:80", i + 10)).collect();
    let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
    let vip = vip_config("web", "198.18.0.10:80", &backends, HealthCheckKind::Tcp);
    let config = config(SMALL_M, vec![with_backups(vip, &[3, 4])]);
    let (mut balancer, mut dp) = installed(&config);
    let mut seed: u64 = 0xbac_c0b5;
    let mut backup_served = false;
    for _ in 0..300 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let id = (seed >> 33) as u32 % 5 + 1;
        if (seed >> 40) & 3 == 0 {
            let weight = (seed >> 20) as u32 % 3;
            balancer.set_weight(id, weight, &mut dp).unwrap_or_else(|e| panic!("set_weight({id}, {weight}): {e}"));
        } else {
            set(&mut balancer, &mut dp, id, (seed >> 20) & 1 == 1);
        }
        // The fake checked every call; the ring follows the rule.
        assert_consistent(&balancer, &dp);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        backup_served |= ring_members(&dp, &key).iter().any(|&id| id >= 4);
    }
    assert!(backup_served, "the walk never reached a backup-only ring");
}

#[test]
fn the_scheduler_is_published_in_the_vip_flags() {
    let mut sticky = equal_vip(3);
    sticky.name = "sticky".to_owned();
    sticky.listen = addr("198.18.0.10:81");
    // A backend serves one VIP on an address, port and protocol.
    for backend in &mut sticky.backends {
        backend.address.set_port(8081);
    }
    sticky.scheduler = Scheduler::SourceHash;
    let config = config(SMALL_M, vec![equal_vip(3), sticky]);
    let (mut balancer, mut dp) = installed(&config);
    let plain = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let sticky = vip_key(addr("198.18.0.10:81"), Protocol::Tcp);
    assert_eq!(dp.vips.get(&plain).map(|v| v.flags), Some(0));
    assert_eq!(dp.vips.get(&sticky).map(|v| v.flags), Some(lb_common::vip::VIP_F_SOURCE_HASH));
    assert_eq!(balancer.vip(2).map(|v| v.scheduler), Some(Scheduler::SourceHash));
    // Every later generation keeps it.
    set(&mut balancer, &mut dp, 5, false);
    let info = dp.vips.get(&sticky).copied();
    assert_eq!(info.map(|v| (v.ring_generation, v.flags)), Some((1, lb_common::vip::VIP_F_SOURCE_HASH)));
    assert_consistent(&balancer, &dp);
}

#[test]
fn drain_keeps_the_backend_up_and_maint_takes_it_down_after_the_ring() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&config);
    let address = addr("198.18.2.11:8080");
    balancer.set_admin("web", address, AdminState::Drain, &mut dp).expect("drain");
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert!(!dp.live_ring(&key).expect("live").contains(&2), "drained: out of the ring");
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_UP), "drained: its flows continue");
    // The fake checks after each call that no live ring names a DOWN backend.
    balancer.set_admin("web", address, AdminState::Maint, &mut dp).expect("maint");
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_DOWN), "maint: its flows move");
    balancer.set_admin("web", address, AdminState::Ready, &mut dp).expect("enable");
    assert!(dp.live_ring(&key).expect("live").contains(&2), "enabled: back in the ring");
    assert!(matches!(
        balancer.set_admin("web", addr("198.18.2.99:8080"), AdminState::Drain, &mut dp),
        Err(StateError::NotRunning { .. })
    ));
}

#[test]
fn a_runtime_weight_outlasts_a_reload_of_the_file_weight_until_cleared() {
    let old = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&old);
    let address = addr("198.18.2.10:8080");
    balancer.set_weight_override("web", address, Some(5), &mut dp).expect("weight");
    let mut new = old.clone();
    new.vips[0].backends[0].weight = 3;
    let actions = crate::control::plan::reload(&old, &new).expect("plan");
    balancer.apply_reload(&actions, &mut dp).expect("reload");
    let weight = |b: &Balancer| b.backends().find(|v| v.address == address).map(|v| v.weight);
    assert_eq!(weight(&balancer), Some(5), "the runtime weight stays in force");
    balancer.set_weight_override("web", address, None, &mut dp).expect("clear");
    assert_eq!(weight(&balancer), Some(3), "cleared: the file's weight");
}

#[test]
fn keep_leaves_a_down_backend_up_in_backends_out_of_the_ring_and_a_reload_can_switch_it() {
    let mut vip =
        vip_config("web", "198.18.0.10:80", &[("198.18.2.10:8080", 1), ("198.18.2.11:8080", 1)], HealthCheckKind::Tcp);
    vip.on_backend_down = OnBackendDown::Keep;
    let old = config(SMALL_M, vec![vip]);
    let (mut balancer, mut dp) = installed(&old);
    set(&mut balancer, &mut dp, 1, true);
    set(&mut balancer, &mut dp, 2, true);
    set(&mut balancer, &mut dp, 2, false);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert!(!dp.live_ring(&key).expect("live").contains(&2), "down: no new flows");
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_UP), "keep: its flows stay");
    // Maintenance still moves them.
    balancer.set_admin("web", addr("198.18.2.11:8080"), AdminState::Maint, &mut dp).expect("maint");
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN));
    balancer.set_admin("web", addr("198.18.2.11:8080"), AdminState::Ready, &mut dp).expect("ready");
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_UP), "kept again");
    // A reload to reschedule takes it down.
    let mut new = old.clone();
    new.vips[0].on_backend_down = OnBackendDown::Reschedule;
    let actions = crate::control::plan::reload(&old, &new).expect("plan");
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0].to_string(), "vip web on_backend_down keep -> reschedule");
    balancer.apply_reload(&actions, &mut dp).expect("reload");
    assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN), "reschedule: its flows move");
}
