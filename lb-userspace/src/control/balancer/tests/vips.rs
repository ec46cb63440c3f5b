use super::*;

/// A VIP named `name` on `listen` with two backends of its own (ports
/// `port0`, `port0 + 1` on 198.18.2.10), probed by `kind`.
fn own_vip(name: &str, listen: &str, protocol: Protocol, port0: u16, kind: HealthCheckKind) -> VipConfig {
    let a = format!("198.18.2.10:{port0}");
    let b = format!("198.18.2.10:{}", port0 + 1);
    let mut vip = vip_config(name, listen, &[(a.as_str(), 1), (b.as_str(), 1)], kind);
    vip.protocol = protocol;
    vip
}

fn with_vips(base: &Config, vips: Vec<VipConfig>) -> Config {
    Config { vips, ..base.clone() }
}

fn id_of(balancer: &Balancer, name: &str) -> u32 {
    balancer.vips().find(|v| v.name == name).map(|v| v.vip_id).unwrap_or_else(|| panic!("no vip {name}"))
}

fn kinds(calls: &[Call]) -> Vec<&'static str> {
    calls
        .iter()
        .map(|c| match c {
            Call::UpsertVip { .. } => "vip",
            Call::RemoveVip { .. } => "remove",
            Call::SetVipAddr { .. } => "addr",
            Call::SetBackend { info, .. } if info.state == BACKEND_STATE_UP => "up",
            Call::SetBackend { .. } => "down",
            Call::WriteSlots { .. } => "slots",
            Call::ResetStats { .. } => "reset",
        })
        .collect()
}

#[test]
fn an_added_vip_takes_the_next_id_and_is_published_once_its_ring_is_whole() {
    let none = HealthCheckKind::None;
    let old = config(SMALL_M, vec![equal_vip(3)]);
    let (mut balancer, mut dp) = installed(&old);
    let new = with_vips(&old, vec![equal_vip(3), own_vip("api", "198.18.0.11:81", Protocol::Tcp, 9000, none)]);
    let start = dp.calls.len();
    reload(&mut balancer, &mut dp, &old, &new);

    assert_eq!(id_of(&balancer, "api"), 2);
    assert_eq!(ids_of(&balancer, 2), [(4, "198.18.2.10:9000".to_owned()), (5, "198.18.2.10:9001".to_owned())]);
    let calls = dp.calls_since(start);
    // Never-used rings are zeroed and counters too: nothing to reset.
    assert_eq!(kinds(calls), ["up", "up", "slots", "vip", "addr"]);
    let Call::WriteSlots { slots } = &calls[2] else { panic!("{calls:?}") };
    assert_eq!(slots.len(), SMALL_M as usize, "generation 0 written whole before the vip");
    assert!(slots.iter().all(|&(i, _)| (ring_base(2, 0, SMALL_M)..ring_base(2, 1, SMALL_M)).contains(&i)));
    let api = vip_key(addr("198.18.0.11:81"), Protocol::Tcp);
    assert_eq!(ring_members(&dp, &api), [4, 5]);
    assert_eq!(calls[4], Call::SetVipAddr { key: api.addr_key(), protos: lb_common::vip_addr::VIP_ADDR_TCP });

    // A checked VIP's backends start unknown: published with an empty
    // ring, and its checkers decide.
    let checked = own_vip("db", "198.18.0.11:5432", Protocol::Tcp, 9100, HealthCheckKind::Tcp);
    let newer = with_vips(&new, [new.vips.clone(), vec![checked]].concat());
    reload(&mut balancer, &mut dp, &new, &newer);
    let db = vip_key(addr("198.18.0.11:5432"), Protocol::Tcp);
    assert_eq!(ring_members(&dp, &db), [BACKEND_ID_NONE]);
    assert_eq!(balancer.backend(6).map(|b| b.health), Some(Health::Unknown));
    set(&mut balancer, &mut dp, 7, true);
    assert_eq!(ring_members(&dp, &db), [7], "the first probe decides");
    assert_consistent(&balancer, &dp);
}

#[test]
fn a_removed_vip_leaves_vips_first_then_its_address_then_its_backends() {
    let none = HealthCheckKind::None;
    let web = own_vip("web", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
    let web2 = own_vip("web2", "198.18.0.10:81", Protocol::Tcp, 8100, none.clone());
    let dns = own_vip("dns", "198.18.0.10:53", Protocol::Udp, 8200, none.clone());
    let other = own_vip("other", "198.18.0.11:53", Protocol::Udp, 8300, none);
    let old = config(SMALL_M, vec![web.clone(), web2, dns.clone(), other.clone()]);
    let (mut balancer, mut dp) = installed(&old);
    let shared = vip_key(addr("198.18.0.10:80"), Protocol::Tcp).addr_key();
    assert_eq!(dp.vip_addrs.get(&shared), Some(&(VIP_ADDR_TCP | VIP_ADDR_UDP)));

    // web2 goes; web keeps its address's TCP bit.
    let new = with_vips(&old, vec![web.clone(), dns, other.clone()]);
    let start = dp.calls.len();
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(kinds(dp.calls_since(start)), ["remove", "down", "down"]);
    assert_eq!(dp.calls[start], Call::RemoveVip { key: vip_key(addr("198.18.0.10:81"), Protocol::Tcp) });
    assert!(balancer.is_retired(3) && balancer.is_retired(4));
    assert!(balancer.backends().all(|b| b.vip_id != 2), "its backends are no longer probed");
    assert!(balancer.vip(2).is_none());

    // dns goes: the shared address is TCP only now.
    let newer = with_vips(&old, vec![web.clone(), other]);
    let start = dp.calls.len();
    reload(&mut balancer, &mut dp, &new, &newer);
    assert_eq!(kinds(dp.calls_since(start)), ["remove", "addr", "down", "down"]);
    assert_eq!(dp.vip_addrs.get(&shared), Some(&VIP_ADDR_TCP));

    // The last VIP on an address takes its entry with it.
    let last = with_vips(&old, vec![web]);
    reload(&mut balancer, &mut dp, &newer, &last);
    assert!(!dp.vip_addrs.contains_key(&vip_key(addr("198.18.0.11:53"), Protocol::Udp).addr_key()));
    // Late verdicts for removed backends change nothing.
    let start = dp.calls.len();
    assert!(set(&mut balancer, &mut dp, 8, true).is_empty());
    assert_eq!(dp.calls.len(), start);
    assert_eq!(balancer.describe_backend(8), "retired backend 198.18.2.10:8301 (id 8)");
}

#[test]
fn a_reused_vip_id_starts_with_clean_rings_and_counters() {
    let none = HealthCheckKind::None;
    let a = own_vip("a", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
    let b = own_vip("b", "198.18.0.10:81", Protocol::Tcp, 8100, none);
    let mut old = config(SMALL_M, vec![a.clone(), b]);
    old.agent.max_vips = 2;
    let (mut balancer, mut dp) = installed(&old);
    // b fills both its rings (generation 1 without backend 3, then back)
    // and counts traffic.
    set(&mut balancer, &mut dp, 3, false);
    set(&mut balancer, &mut dp, 3, true);
    set(&mut balancer, &mut dp, 4, false);
    dp.vip_stats.insert(2, 1000);

    // c takes b's id, the only one free; its backends are unknown yet.
    let c = own_vip("c", "198.18.0.12:80", Protocol::Tcp, 8200, HealthCheckKind::Tcp);
    let new = with_vips(&old, vec![a, c]);
    let start = dp.calls.len();
    reload(&mut balancer, &mut dp, &old, &new);
    assert_eq!(id_of(&balancer, "c"), 2);
    let calls = dp.calls_since(start);
    // b shared a's address: VIP_ADDRS changes only for c's. c's backends
    // are written down (unknown) once its ring is published.
    assert_eq!(kinds(calls), ["remove", "down", "reset", "slots", "vip", "down", "down", "addr"]);
    assert_eq!(dp.vip_stats.get(&2), None, "b's counts are not c's");
    let Call::WriteSlots { slots } = &calls[3] else { panic!("{calls:?}") };
    assert_eq!(slots.len(), SMALL_M as usize, "every slot of b's ring overwritten, empty ones too");
    let key = vip_key(addr("198.18.0.12:80"), Protocol::Tcp);
    assert_eq!(ring_members(&dp, &key), [BACKEND_ID_NONE]);

    // Its first flip rewrites generation 1 whole too: the fake's readers
    // would see b's (down) backends in any slot left over.
    set(&mut balancer, &mut dp, 5, true);
    assert_eq!(ring_members(&dp, &key), [5]);
    assert_eq!(dp.vips.get(&key).map(|v| v.ring_generation), Some(1));
    assert!(dp.ring(2, 1, SMALL_M).iter().all(|&id| id == 5));
    set(&mut balancer, &mut dp, 6, true);
    assert_eq!(ring_members(&dp, &key), [5, 6]);
    assert_consistent(&balancer, &dp);
}

#[test]
fn a_renamed_vip_takes_over_its_listen_and_its_id() {
    let old = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&old);
    let mut renamed = equal_vip(2);
    renamed.name = "www".to_owned();
    let new = with_vips(&old, vec![renamed]);
    let start = dp.calls.len();
    reload(&mut balancer, &mut dp, &old, &new);
    // Out of the maps first, then in again under the reused id.
    assert_eq!(
        kinds(dp.calls_since(start)),
        ["remove", "addr", "down", "down", "up", "up", "reset", "slots", "vip", "addr"]
    );
    assert_eq!(balancer.vips().map(|v| (v.vip_id, v.name)).collect::<Vec<_>>(), [(1, "www")]);
    assert_eq!(ids_of(&balancer, 1), [(3, "198.18.2.10:8080".to_owned()), (4, "198.18.2.11:8080".to_owned())]);
}

#[test]
fn a_new_listen_is_a_new_vip_and_a_new_scheduler_is_not() {
    let old = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&old);
    let mut sticky = old.clone();
    sticky.vips[0].scheduler = Scheduler::SourceHash;
    let start = dp.calls.len();
    let change = reload(&mut balancer, &mut dp, &old, &sticky);
    assert_eq!(change, Change { backends_written: 0, slots_written: 0, rings_published: 1 });
    let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
    assert_eq!(
        dp.calls_since(start),
        [Call::UpsertVip {
            key,
            info: VipInfo {
                vip_id: 1,
                ring_size: SMALL_M,
                ring_generation: 0,
                flags: lb_common::vip::VIP_F_SOURCE_HASH
            }
        }],
        "the same ring, republished with the flag"
    );

    let mut moved = sticky.clone();
    moved.vips[0].listen = addr("198.18.0.20:80");
    reload(&mut balancer, &mut dp, &sticky, &moved);
    assert!(!dp.vips.contains_key(&key));
    assert_eq!(ids_of(&balancer, 1), [(3, "198.18.2.10:8080".to_owned()), (4, "198.18.2.11:8080".to_owned())]);
    let moved_key = vip_key(addr("198.18.0.20:80"), Protocol::Tcp);
    assert_eq!(dp.vips.get(&moved_key).map(|v| v.flags), Some(lb_common::vip::VIP_F_SOURCE_HASH));
}

#[test]
fn more_vips_than_max_vips_are_refused_without_writes() {
    let none = HealthCheckKind::None;
    let old = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&old);
    let extra: Vec<VipConfig> = (0..4)
        .map(|i| {
            own_vip(&format!("v{i}"), &format!("198.18.0.11:{}", 80 + i), Protocol::Tcp, 9000 + 2 * i, none.clone())
        })
        .collect();
    // The plan refuses this already, naming agent.max_vips; the balancer
    // checks again.
    let actions: Vec<Action> = extra.iter().map(|vip| Action::AddVip { vip: vip.clone() }).collect();
    let start = dp.calls.len();
    let result = balancer.apply_reload(&actions, &mut dp);
    assert!(matches!(result, Err(StateError::TooManyVips { count: 5, max: 4 })), "{result:?}");
    assert_eq!(
        result.map_err(|e| e.to_string()).err().as_deref(),
        Some("5 vips configured, but the maps have room for 4 (agent.max_vips)")
    );
    assert_eq!(dp.calls.len(), start);
    assert_eq!(balancer.vips().len(), 1);
    // Four fit once web leaves: ids 1 to 4, web's reused.
    let four = with_vips(&old, extra);
    reload(&mut balancer, &mut dp, &old, &four);
    let ids: Vec<(u32, &str)> = balancer.vips().map(|v| (v.vip_id, v.name)).collect();
    assert_eq!(ids, [(1, "v0"), (2, "v1"), (3, "v2"), (4, "v3")]);
}

#[test]
fn a_failed_removal_holds_its_id_back_until_a_retry_finishes_it() {
    let none = HealthCheckKind::None;
    let a = own_vip("a", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
    let b = own_vip("b", "198.18.0.11:53", Protocol::Udp, 8100, none.clone());
    let c = own_vip("c", "198.18.0.12:80", Protocol::Tcp, 8200, none);
    let mut old = config(SMALL_M, vec![a.clone(), b]);
    old.agent.max_vips = 2;
    let new = with_vips(&old, vec![a, c]);
    let actions = crate::control::plan::reload(&old, &new).unwrap_or_else(|e| panic!("plan: {e}"));
    // Removing b and adding c in b's id takes: remove, addr, down, down,
    // reset, up, up, slots, vip, addr. Fail each in turn.
    for failing in 0..10 {
        let (mut balancer, mut dp) = installed(&old);
        let start = dp.calls.len();
        dp.fail_in(failing);
        let result = balancer.apply_reload(&actions, &mut dp);
        assert!(result.as_ref().is_err_and(|e| !e.changed_nothing()), "call {failing}: {result:?}");
        if failing == 0 {
            // b is still in VIPS: nothing may touch the rings of its id.
            assert_eq!(dp.calls_since(start), []);
            assert_eq!(balancer.vip(2).map(|v| (v.name, v.ring_generation)), Some(("c", None)));
            // Nor may a health event of c while the removal still fails
            // (the fake panics on a write into a ring that VIPS names).
            dp.fail_in(0);
            assert!(balancer.set_health(5, Health::Up, &mut dp).is_err());
            assert_eq!(dp.calls_since(start), []);
            // Once it succeeds, the same event finishes both.
            set(&mut balancer, &mut dp, 5, true);
            assert_consistent(&balancer, &dp);
        }
        // The fake checked the readers throughout; an empty reload, as
        // SIGHUP with the same file sends, finishes the job.
        balancer.apply_reload(&[], &mut dp).unwrap_or_else(|e| panic!("retry after call {failing}: {e}"));
        assert_consistent(&balancer, &dp);
        assert!(balancer.install(&mut dp).unwrap_or_else(|e| panic!("{e}")).is_empty(), "call {failing}");
    }
}

#[test]
fn readers_never_see_a_partial_vip_while_reloads_add_and_remove_them() {
    // Six services over two addresses and both protocols, at most four
    // running (max_vips); a fixed pseudo-random walk of reloads and
    // health flips. The fake checks the readers after every call, and
    // `reload` checks VIPS, VIP_ADDRS and every ring after every step.
    let services: Vec<VipConfig> = (0..6u16)
        .map(|i| {
            let listen = format!("198.18.0.{}:{}", 10 + i % 2, 50 + i);
            let protocol = if i % 3 == 0 { Protocol::Udp } else { Protocol::Tcp };
            own_vip(&format!("s{i}"), &listen, protocol, 8000 + 10 * i, HealthCheckKind::Tcp)
        })
        .collect();
    let pick = |mask: u64| -> Vec<VipConfig> {
        let chosen: Vec<VipConfig> =
            services.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, v)| v.clone()).take(4).collect();
        if chosen.is_empty() { vec![services[0].clone()] } else { chosen }
    };
    const RING: u32 = 1021;
    let mut running = config(RING, pick(0b11));
    let (mut balancer, mut dp) = installed(&running);
    let mut seed: u64 = 0x7e10ad;
    let mut reused = 0;
    for _ in 0..200 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        if (seed >> 60) & 1 == 0 {
            let new = with_vips(&running, pick(seed >> 20));
            let actions = crate::control::plan::reload(&running, &new).unwrap_or_else(|e| panic!("plan: {e}"));
            let freed: BTreeSet<u32> = balancer.used_ids.clone();
            balancer.apply_reload(&actions, &mut dp).unwrap_or_else(|e| panic!("apply: {e}"));
            for action in &actions {
                if let Action::AddVip { vip } = action {
                    let id = id_of(&balancer, &vip.name);
                    assert!((1..=4).contains(&id), "vip id {id} beyond max_vips");
                    assert_eq!(dp.vip_stats.get(&id), None, "{} inherited counts", vip.name);
                    reused += usize::from(freed.contains(&id));
                }
            }
            running = new;
        } else {
            let live: Vec<u32> = balancer.backends().map(|b| b.backend_id).collect();
            let id = live[(seed >> 33) as usize % live.len()];
            set(&mut balancer, &mut dp, id, (seed >> 20) & 1 == 1);
        }
        assert_consistent(&balancer, &dp);
        // Traffic on every live VIP, for the next one to take its id.
        for info in dp.vips.values() {
            *dp.vip_stats.entry(info.vip_id).or_insert(0) += 1;
        }
    }
    assert!(reused > 10, "the walk reused only {reused} ids");
}
