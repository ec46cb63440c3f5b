//! Adopting pinned maps: ids, health and live rings carry over, and only
//! what differs is written.

use super::*;
use crate::control::plan;

/// A checked VIP (TCP probes), so health is not simply "up".
fn checked_vip(backends: &[&str]) -> VipConfig {
    let backends: Vec<(&str, u32)> = backends.iter().map(|&a| (a, 1)).collect();
    vip_config("web", "198.18.0.10:80", &backends, HealthCheckKind::Tcp)
}

fn adopt(config: &Config, dp: &FakeDataplane) -> Balancer {
    Balancer::adopt(config, &dp.pinned_state()).unwrap_or_else(|e| panic!("adopt refused: {e}"))
}

/// (address, id, health) of VIP `web`'s backends.
fn web_backends(balancer: &Balancer) -> Vec<(SocketAddr, u32, Health)> {
    let web = balancer.vips().find(|v| v.name == "web").expect("vip web");
    web.backends.iter().map(|b| (b.address, b.backend_id, b.health)).collect()
}

#[test]
fn an_unchanged_config_is_adopted_without_a_write_and_keeps_health() {
    let config = config(SMALL_M, vec![checked_vip(&["198.18.2.10:8080", "198.18.2.11:8080", "198.18.2.12:8080"])]);
    let (mut first, mut dp) = installed(&config);
    for (id, up) in [(1, true), (2, true), (3, false)] {
        set(&mut first, &mut dp, id, up);
    }
    let ring_before = dp.live_ring(&vip_key(addr("198.18.0.10:80"), Protocol::Tcp)).map(<[u32]>::to_vec);

    let mut second = adopt(&config, &dp);
    let calls = dp.calls.len();
    let change = second.install(&mut dp).expect("install");
    assert_eq!(change, Change::default(), "nothing to write: {:?}", dp.calls_since(calls));
    assert!(dp.calls_since(calls).is_empty(), "{:?}", dp.calls_since(calls));
    assert_eq!(web_backends(&second), web_backends(&first), "same ids and health");
    assert_eq!(dp.live_ring(&vip_key(addr("198.18.0.10:80"), Protocol::Tcp)).map(<[u32]>::to_vec), ring_before);
}

#[test]
fn ids_survive_a_reload_history_and_new_backends_take_unused_ones() {
    let old = config(SMALL_M, vec![checked_vip(&["198.18.2.10:8080", "198.18.2.11:8080", "198.18.2.12:8080"])]);
    let (mut first, mut dp) = installed(&old);
    for id in 1..=3 {
        set(&mut first, &mut dp, id, true);
    }
    // A reload removes .11 (id 2, retired) and adds .13 (id 4).
    let new = config(SMALL_M, vec![checked_vip(&["198.18.2.13:8080", "198.18.2.10:8080", "198.18.2.12:8080"])]);
    let actions = plan::reload(&old, &new).expect("plan");
    first.apply_reload(&actions, &mut dp).expect("reload");
    set(&mut first, &mut dp, 4, true);

    let mut second = adopt(&new, &dp);
    let calls = dp.calls.len();
    let change = second.install(&mut dp).expect("install");
    assert_eq!((change.slots_written, change.rings_published), (0, 0), "{:?}", dp.calls_since(calls));
    let ids: Vec<(SocketAddr, u32)> = web_backends(&second).into_iter().map(|(a, id, _)| (a, id)).collect();
    assert_eq!(
        ids,
        vec![(addr("198.18.2.13:8080"), 4), (addr("198.18.2.10:8080"), 1), (addr("198.18.2.12:8080"), 3)],
        "each backend keeps the id its flows name"
    );

    // One more added after the restart: past every id the maps may name.
    let more = config(
        SMALL_M,
        vec![checked_vip(&["198.18.2.13:8080", "198.18.2.10:8080", "198.18.2.12:8080", "198.18.2.14:8080"])],
    );
    let third = adopt(&more, &dp);
    let added = web_backends(&third).into_iter().find(|(a, _, _)| *a == addr("198.18.2.14:8080")).expect("added");
    assert_eq!((added.1, added.2), (5, Health::Unknown), "a fresh id, unknown until probed");
}

#[test]
fn a_backend_removed_while_no_agent_ran_goes_down_after_the_ring_drops_it() {
    let old = config(SMALL_M, vec![checked_vip(&["198.18.2.10:8080", "198.18.2.11:8080", "198.18.2.12:8080"])]);
    let (mut first, mut dp) = installed(&old);
    for id in 1..=3 {
        set(&mut first, &mut dp, id, true);
    }
    let new = config(SMALL_M, vec![checked_vip(&["198.18.2.10:8080", "198.18.2.12:8080"])]);
    let mut second = adopt(&new, &dp);
    // The fake checks after every call that no live ring names a backend
    // that is not UP: the removed one goes DOWN only after the new ring.
    second.install(&mut dp).expect("install");
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_DOWN), "the removed backend is down");
    let ring = dp.live_ring(&vip_key(addr("198.18.0.10:80"), Protocol::Tcp)).expect("live");
    assert!(!ring.contains(&2) && ring.contains(&1) && ring.contains(&3), "the ring holds the other two");
}

#[test]
fn a_vip_removed_while_no_agent_ran_leaves_the_vip_map() {
    let other = vip_config("api", "198.18.0.11:81", &[("198.18.2.20:9000", 1)], HealthCheckKind::None);
    let old = config(SMALL_M, vec![equal_vip(2), other]);
    let (_, mut dp) = installed(&old);
    let new = config(SMALL_M, vec![equal_vip(2)]);
    let mut second = adopt(&new, &dp);
    second.install(&mut dp).expect("install");
    assert!(!dp.vips.contains_key(&vip_key(addr("198.18.0.11:81"), Protocol::Tcp)), "api is gone");
    assert_eq!(dp.backends.get(&3).map(|b| b.state), Some(BACKEND_STATE_DOWN), "its backend is down");
    assert!(dp.vips.contains_key(&vip_key(addr("198.18.0.10:80"), Protocol::Tcp)), "web stays");
}

#[test]
fn rings_of_another_size_are_refused() {
    let config_a = config(SMALL_M, vec![equal_vip(2)]);
    let (_, dp) = installed(&config_a);
    let config_b = config(M, vec![equal_vip(2)]);
    let refused = Balancer::adopt(&config_b, &dp.pinned_state()).expect_err("another ring size");
    assert!(refused.to_string().contains("ring_size"), "{refused}");
}

#[test]
fn a_kept_down_backend_is_adopted_as_down_not_as_its_up_entry() {
    let mut vip = checked_vip(&["198.18.2.10:8080", "198.18.2.11:8080"]);
    vip.on_backend_down = OnBackendDown::Keep;
    let config = config(SMALL_M, vec![vip]);
    let (mut first, mut dp) = installed(&config);
    set(&mut first, &mut dp, 1, true);
    set(&mut first, &mut dp, 2, true);
    set(&mut first, &mut dp, 2, false);
    assert_eq!(dp.backends.get(&2).map(|b| b.state), Some(BACKEND_STATE_UP), "kept: its entry stays up");

    let mut second = adopt(&config, &dp);
    let health: Vec<Health> = web_backends(&second).into_iter().map(|(_, _, h)| h).collect();
    assert_eq!(health, [Health::Up, Health::Down], "its health note wins over the UP entry");
    let calls = dp.calls.len();
    second.install(&mut dp).expect("install");
    assert!(dp.calls_since(calls).is_empty(), "nothing to write: {:?}", dp.calls_since(calls));
}
