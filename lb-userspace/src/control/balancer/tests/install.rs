use super::*;

#[test]
fn ids_are_dense_in_config_order() {
    let config = config(
        SMALL_M,
        vec![
            vip_config(
                "a",
                "198.18.0.10:80",
                &[("198.18.2.10:8080", 1), ("198.18.2.11:8080", 2)],
                HealthCheckKind::Tcp,
            ),
            vip_config(
                "b",
                "198.18.0.11:443",
                &[("198.18.2.10:8443", 1), ("198.18.2.12:8443", 1), ("[2001:db8::5]:8443", 0)],
                HealthCheckKind::None,
            ),
        ],
    );
    let balancer = balancer(&config);
    let vips: Vec<(u32, &str)> = balancer.vips().map(|v| (v.vip_id, v.name)).collect();
    assert_eq!(vips, [(1, "a"), (2, "b")]);
    let backends: Vec<(u32, u32, SocketAddr, u32, Health)> =
        balancer.backends().map(|b| (b.backend_id, b.vip_id, b.address, b.weight, b.health)).collect();
    assert_eq!(
        backends,
        [
            (1, 1, addr("198.18.2.10:8080"), 1, Health::Unknown),
            (2, 1, addr("198.18.2.11:8080"), 2, Health::Unknown),
            (3, 2, addr("198.18.2.10:8443"), 1, Health::Up),
            (4, 2, addr("198.18.2.12:8443"), 1, Health::Up),
            (5, 2, addr("[2001:db8::5]:8443"), 0, Health::Up),
        ]
    );
    let b = balancer.vip(2).unwrap_or_else(|| panic!("no vip 2"));
    assert_eq!(b.backends.iter().map(|b| b.backend_id).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(b.ring_generation, None, "nothing installed yet");
    assert!(balancer.vip(0).is_none() && balancer.vip(3).is_none());
    assert!(balancer.backend(0).is_none() && balancer.backend(6).is_none());
    assert_eq!(balancer.describe_backend(4), "vip b backend 198.18.2.12:8443 (id 4)");
    assert_eq!(balancer.describe_backend(9), "unknown backend (id 9)");
}

#[test]
fn byte_order_matches_the_wire() {
    let info = backend_info(addr("198.18.2.11:8080"), BACKEND_STATE_UP);
    assert_eq!(info.addr_be, [u32::from_ne_bytes([198, 18, 2, 11]), 0, 0, 0]);
    assert_eq!(info.port_be.to_ne_bytes(), [0x1f, 0x90]);
    assert_eq!((info.family, info.state), (FAMILY_V4, BACKEND_STATE_UP));

    let info = backend_info(addr("[2001:db8::5]:443"), BACKEND_STATE_DOWN);
    assert_eq!(info.addr_be[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    assert_eq!(info.addr_be[3].to_ne_bytes(), [0, 0, 0, 5]);
    assert_eq!(info.port_be.to_ne_bytes(), [0x01, 0xbb]);
    assert_eq!(info.family, FAMILY_V6);

    let key = vip_key(addr("198.18.0.10:53"), Protocol::Udp);
    assert_eq!(key.addr_be, [u32::from_ne_bytes([198, 18, 0, 10]), 0, 0, 0]);
    assert_eq!(key.port_be.to_ne_bytes(), [0, 53]);
    assert_eq!((key.proto, key.family), (lb_common::PROTO_UDP, FAMILY_V4));
}

#[test]
fn install_writes_every_backend_and_a_full_ring() {
    let config = config(M, vec![equal_vip(3)]);
    let (balancer, dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);

    let kinds: Vec<&str> = dp
        .calls
        .iter()
        .map(|c| match c {
            Call::SetBackend { .. } => "backend",
            Call::WriteSlots { .. } => "slots",
            Call::UpsertVip { .. } => "vip",
            Call::SetVipAddr { .. } => "addr",
            Call::RemoveVip { .. } | Call::ResetStats { .. } => "other",
        })
        .collect();
    assert_eq!(kinds, ["backend", "backend", "backend", "slots", "vip", "addr"]);
    for id in 1..=3 {
        let address = addr(&format!("198.18.2.{}:8080", id + 9));
        assert_eq!(dp.backends.get(&id), Some(&backend_info(address, BACKEND_STATE_UP)));
    }
    assert_eq!(dp.vips.get(&key), Some(&VipInfo { vip_id: 1, ring_size: M, ring_generation: 0, flags: 0 }));
    let live = dp.live_ring(&key).unwrap_or_else(|| panic!("no live ring"));
    assert!(live.iter().all(|&id| (1..=3).contains(&id)), "every slot names a backend");
    assert_consistent(&balancer, &dp);
    assert_eq!(balancer.vip(1).and_then(|v| v.ring_generation), Some(0));
}

#[test]
fn install_reports_and_is_idempotent() {
    let config = config(M, vec![equal_vip(3)]);
    let mut balancer = balancer(&config);
    let mut dp = FakeDataplane::for_config(&config);
    let change = balancer.install(&mut dp).unwrap_or_else(|e| panic!("install: {e}"));
    assert_eq!(change, Change { backends_written: 3, slots_written: M as usize, rings_published: 1 });
    let again = balancer.install(&mut dp).unwrap_or_else(|e| panic!("install: {e}"));
    assert!(again.is_empty(), "second install wrote {again:?}");
}

#[test]
fn unknown_health_installs_down_and_an_empty_ring() {
    let config = config(
        SMALL_M,
        vec![vip_config(
            "web",
            "198.18.0.10:80",
            &[("198.18.2.10:80", 1), ("198.18.2.11:80", 1)],
            HealthCheckKind::Tcp,
        )],
    );
    let (mut balancer, mut dp) = installed(&config);
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(dp.backends.get(&1).map(|b| b.state), Some(BACKEND_STATE_DOWN));
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_DOWN));
    assert!(dp.live_ring(&key).is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE)));
    assert!(!dp.calls.iter().any(|c| matches!(c, Call::WriteSlots { .. })), "zeroed ring needs no writes");

    // The first backend to pass takes the whole ring.
    set(&mut balancer, &mut dp, 2, true);
    assert!(dp.live_ring(&key).is_some_and(|r| r.iter().all(|&id| id == 2)));
    assert_consistent(&balancer, &dp);
}

#[test]
fn failed_install_is_finished_by_install() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    // Three backends, the slots, the vip, its address.
    for failing in 0..6 {
        let mut balancer = balancer(&config);
        let mut dp = FakeDataplane::for_config(&config);
        dp.fail_in(failing);
        assert!(balancer.install(&mut dp).is_err(), "install call {failing} did not fail");
        balancer.install(&mut dp).unwrap_or_else(|e| panic!("retry: {e}"));
        assert_consistent(&balancer, &dp);
    }
}

#[test]
fn configs_that_do_not_fit_are_refused() {
    let mut bad = config(65536, vec![equal_vip(1)]);
    assert!(matches!(Balancer::new(&bad), Err(StateError::RingSizeNotPrime { ring_size: 65536 })));

    bad = config(SMALL_M, vec![equal_vip(1); 5]);
    assert!(matches!(Balancer::new(&bad), Err(StateError::TooManyVips { count: 5, max: 4 })));

    let addrs: Vec<String> = (0..MAX_BACKENDS).map(|i| format!("198.18.{}.{}:80", 2 + i / 250, i % 250 + 1)).collect();
    let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
    bad = config(SMALL_M, vec![vip_config("big", "198.18.0.10:80", &backends, HealthCheckKind::None)]);
    assert!(matches!(
        Balancer::new(&bad),
        Err(StateError::TooManyBackends { count, max })
            if count == MAX_BACKENDS as usize && max == MAX_BACKENDS - 1
    ));
    bad.vips[0].backends.pop();
    assert!(Balancer::new(&bad).is_ok(), "MAX_BACKENDS - 1 backends fit");

    bad = config(4_294_967_291, vec![equal_vip(1)]);
    assert!(matches!(Balancer::new(&bad), Err(StateError::MaglevTooLarge { .. })));
}

/// Each slot of VIP `vip_id`'s live ring as its backend's address: what a
/// packet hashed to that slot reaches, whatever ids name it.
fn ring_by_address(balancer: &Balancer, vip_id: u32) -> Vec<Option<SocketAddr>> {
    let ring = balancer.live_ring(vip_id).unwrap_or_else(|| panic!("vip {vip_id} has no live ring"));
    ring.iter().map(|&id| balancer.backend(id).map(|b| b.address)).collect()
}

#[test]
fn gateways_with_one_config_write_identical_tables_whatever_their_reload_history() {
    // Two gateways behind ECMP (issue 14): a flow moved from one to the
    // other must reach the same backend.
    let config = config(SMALL_M, vec![equal_vip(5)]);
    let (a, dp_a) = installed(&config);
    let (b, dp_b) = installed(&config);
    assert_eq!(dp_a.maglev, dp_b.maglev, "fresh starts write byte-identical Maglev arrays");
    assert_eq!(dp_a.backends, dp_b.backends);
    assert_eq!(dp_a.vips, dp_b.vips);

    // A third took a detour: a backend removed, then added back (a new id,
    // since ids are never reused), and another added and removed.
    let (mut c, mut dp_c) = installed(&config);
    let mut fewer = config.clone();
    fewer.vips[0].backends.remove(2);
    let mut more = config.clone();
    more.vips[0].backends.push(BackendConfig {
        address: addr("198.18.2.99:8080"),
        weight: 1,
        backup: false,
        health_check: None,
    });
    reload(&mut c, &mut dp_c, &config, &fewer);
    reload(&mut c, &mut dp_c, &fewer, &more);
    reload(&mut c, &mut dp_c, &more, &config);
    assert_ne!(dp_a.maglev, dp_c.maglev, "its ids differ...");
    assert_eq!(ring_by_address(&a, 1), ring_by_address(&c, 1), "...but every slot reaches the same backend");
    assert_eq!(ring_by_address(&a, 1), ring_by_address(&b, 1));
}
