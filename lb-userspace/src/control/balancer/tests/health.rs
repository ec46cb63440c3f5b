use super::*;

#[test]
fn backend_down_publishes_a_ring_without_it_then_marks_it_down() {
    let config = config(M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    let before = balancer.live_ring(1).map(<[u32]>::to_vec).unwrap_or_default();
    let start = dp.calls.len();

    let change = set(&mut balancer, &mut dp, 2, false);

    let calls = dp.calls_since(start);
    assert_eq!(calls.len(), 3, "calls: {calls:?}");
    let Call::WriteSlots { slots } = &calls[0] else { panic!("first call {:?}, want slot writes", calls[0]) };
    let generation_1 = ring_base(1, 1, M)..ring_base(1, 1, M) + M;
    assert!(slots.iter().all(|(i, _)| generation_1.contains(i)), "slots written outside generation 1");
    assert_eq!(
        calls[1],
        Call::UpsertVip { key, info: VipInfo { vip_id: 1, ring_size: M, ring_generation: 1, flags: 0 } }
    );
    assert_eq!(
        calls[2],
        Call::SetBackend { backend_id: 2, info: backend_info(addr("198.18.2.11:8080"), BACKEND_STATE_DOWN) }
    );
    assert_eq!(change.rings_published, 1);
    assert_eq!(change.backends_written, 1);
    assert_eq!(change.slots_written, slots.len());

    let after = dp.live_ring(&key).unwrap_or_else(|| panic!("no live ring"));
    assert!(!after.contains(&2));
    assert!(after.iter().all(|&id| id != BACKEND_ID_NONE));
    let moved = fraction_changed(&before, after);
    assert!(moved <= 1.0 / 3.0 + 0.03, "moved {moved:.4} of slots");
    assert_consistent(&balancer, &dp);
}

#[test]
fn down_then_up_restores_the_ring_without_rewriting_it() {
    let config = config(M, vec![equal_vip(10)]);
    let (mut balancer, mut dp) = installed(&config);
    let original = balancer.live_ring(1).map(<[u32]>::to_vec).unwrap_or_default();

    let down = set(&mut balancer, &mut dp, 4, false);
    let moved = fraction_changed(&original, balancer.live_ring(1).unwrap_or_default());
    assert!(moved <= 0.1 + 0.03, "moved {moved:.4} of slots");
    assert_eq!(down.rings_published, 1);

    let start = dp.calls.len();
    let up = set(&mut balancer, &mut dp, 4, true);
    assert_eq!(balancer.live_ring(1), Some(original.as_slice()));
    // Generation 0 still holds the original ring: flipping back is free.
    assert_eq!(up, Change { backends_written: 1, slots_written: 0, rings_published: 1 });
    let calls = dp.calls_since(start);
    assert!(matches!(calls[0], Call::SetBackend { backend_id: 4, info } if info.state == BACKEND_STATE_UP));
    assert!(matches!(calls[1], Call::UpsertVip { info, .. } if info.ring_generation == 0));
    assert_consistent(&balancer, &dp);
}

#[test]
fn steady_state_writes_only_the_diff() {
    let n = 10;
    let config = config(M, vec![equal_vip(n)]);
    let (mut balancer, mut dp) = installed(&config);
    // The first flip fills generation 1 from zero; after that each change
    // writes the slots that differ from the ring two versions back.
    set(&mut balancer, &mut dp, 1, false);
    for id in 2..=4 {
        let before = balancer.live_ring(1).map(<[u32]>::to_vec).unwrap_or_default();
        let change = set(&mut balancer, &mut dp, id, false);
        let after = balancer.live_ring(1).unwrap_or_default();
        let moved = fraction_changed(&before, after);
        let up = (n - id as usize + 1) as f64;
        assert!(moved <= 1.0 / up + 0.03, "backend {id} down moved {moved:.4}");
        let written = change.slots_written as f64 / f64::from(M);
        assert!(written <= 2.0 * (1.0 / up + 0.03), "backend {id} down wrote {written:.4} of the ring");
    }
    assert_consistent(&balancer, &dp);
}

#[test]
fn readers_never_see_a_backend_that_is_not_up() {
    let n = 10u32;
    let config = config(SMALL_M, vec![equal_vip(n as usize)]);
    let (mut balancer, mut dp) = installed(&config);
    // A fixed pseudo-random walk (LCG) of health flips; the fake checks
    // every live ring after every single call.
    let mut seed: u64 = 0x5eed;
    for _ in 0..300 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let id = (seed >> 33) as u32 % n + 1;
        let up = (seed >> 20) & 1 == 1;
        set(&mut balancer, &mut dp, id, up);
        assert_consistent(&balancer, &dp);
    }
}

#[test]
fn all_down_empties_the_ring() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&config);
    for id in 1..=3 {
        set(&mut balancer, &mut dp, id, false);
    }
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert!(dp.live_ring(&key).is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE)));
    assert_consistent(&balancer, &dp);
    // And back: one backend up takes every slot.
    set(&mut balancer, &mut dp, 3, true);
    assert!(dp.live_ring(&key).is_some_and(|r| r.iter().all(|&id| id == 3)));
}

#[test]
fn weight_zero_is_up_but_never_in_the_ring() {
    let config = config(
        SMALL_M,
        vec![vip_config(
            "web",
            "198.18.0.10:80",
            &[("198.18.2.10:80", 1), ("198.18.2.11:80", 0), ("198.18.2.12:80", 3)],
            HealthCheckKind::None,
        )],
    );
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_UP), "drained, keeps its flows");
    assert!(dp.live_ring(&key).is_some_and(|r| !r.contains(&2)));
    // Its health changes move no slot.
    let change = set(&mut balancer, &mut dp, 2, false);
    assert_eq!(change, Change { backends_written: 1, slots_written: 0, rings_published: 0 });
    set(&mut balancer, &mut dp, 1, false);
    set(&mut balancer, &mut dp, 3, false);
    set(&mut balancer, &mut dp, 2, true);
    assert!(dp.live_ring(&key).is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE)));
    assert_eq!(balancer.backend(2).map(|b| b.ring_slots), Some(0));
    assert_consistent(&balancer, &dp);
}

#[test]
fn two_vips_use_their_own_rings() {
    let config = config(
        SMALL_M,
        vec![
            vip_config("a", "198.18.0.10:80", &[("198.18.2.10:80", 1), ("198.18.2.11:80", 1)], HealthCheckKind::None),
            // A backend serves one VIP on an address, port and protocol.
            vip_config("b", "198.18.0.10:81", &[("198.18.2.10:81", 1), ("198.18.2.11:81", 1)], HealthCheckKind::None),
        ],
    );
    let (mut balancer, mut dp) = installed(&config);
    set(&mut balancer, &mut dp, 1, false);
    set(&mut balancer, &mut dp, 4, false);
    set(&mut balancer, &mut dp, 1, true);

    // VIP 1 owns MAGLEV[0, 2M), VIP 2 owns [2M, 4M).
    let m = SMALL_M;
    for call in &dp.calls {
        if let Call::WriteSlots { slots } = call {
            let ids: Vec<u32> = slots.iter().map(|&(_, id)| id).filter(|&id| id != 0).collect();
            let vip1 = ids.iter().all(|id| [1, 2].contains(id));
            let range = if vip1 { 0..2 * m } else { 2 * m..4 * m };
            assert!(slots.iter().all(|(i, _)| range.contains(i)), "slots outside the vip's rings");
        }
    }
    assert_eq!(dp.ring(1, 0, m).iter().filter(|&&id| id != 1 && id != 2).count(), 0);
    assert_eq!(dp.ring(2, 1, m).iter().filter(|&&id| id != 3).count(), 0, "vip b: only backend 3 left");
    assert_eq!(balancer.vip(1).and_then(|v| v.ring_generation), Some(0));
    assert_eq!(balancer.vip(2).and_then(|v| v.ring_generation), Some(1));
    assert_consistent(&balancer, &dp);
}

#[test]
fn unknown_backend_is_refused_without_writes() {
    let config = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&config);
    let start = dp.calls.len();
    for id in [0, 3, u32::MAX] {
        let result = balancer.set_health(id, Health::Up, &mut dp);
        assert!(matches!(result, Err(StateError::UnknownBackend { backend_id }) if backend_id == id));
    }
    assert_eq!(dp.calls.len(), start);
}

#[test]
fn same_verdict_twice_writes_nothing() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&config);
    assert!(set(&mut balancer, &mut dp, 1, true).is_empty());
    assert!(!set(&mut balancer, &mut dp, 1, false).is_empty());
    assert!(set(&mut balancer, &mut dp, 1, false).is_empty());
}

#[test]
fn failed_writes_are_finished_by_a_retry() {
    let config = config(SMALL_M, vec![equal_vip(5)]);
    // Going down takes three calls (slots, vip, backend); going up takes
    // three too (backend, slots, vip). Fail each in turn, then retry.
    for failing in 0..3 {
        for up in [false, true] {
            let (mut balancer, mut dp) = installed(&config);
            // Leave both generations different from the next ring, so the
            // change below writes slots: live {1,3,4}, other {1,2,3,4}
            // (down case); live {1,4}, other {1,3,4} (up case).
            set(&mut balancer, &mut dp, 5, false);
            set(&mut balancer, &mut dp, 2, false);
            if up {
                set(&mut balancer, &mut dp, 3, false);
            }
            let id = if up { 2 } else { 4 };
            dp.fail_in(failing);
            let error = balancer.set_health(id, health(up), &mut dp);
            assert!(matches!(error, Err(StateError::Dataplane { .. })), "call {failing} of {id}→{up} did not fail");
            // The readers' invariant held throughout (the fake checks it);
            // a retry converges.
            set(&mut balancer, &mut dp, id, up);
            assert_consistent(&balancer, &dp);
            // And later changes still diff against the right shadows.
            set(&mut balancer, &mut dp, 1, false);
            set(&mut balancer, &mut dp, 5, true);
            assert_consistent(&balancer, &dp);
        }
    }
}
