use super::*;

#[test]
fn local_addresses_are_marked_and_unmarked_and_keep_a_backends_role() {
    let config = config(SMALL_M, vec![equal_vip(2)]);
    let (mut balancer, mut dp) = installed(&config);
    let key = |ip: &str| VipAddrKey::new(ip.parse().expect("ip"));
    // The backends' addresses have their role from the install on.
    assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&ADDR_ROLE_BACKEND));
    // A gateway address that is also a backend's (odd, but the roles add up).
    let gw: Vec<IpAddr> =
        ["198.18.2.1", "2001:db8:2::1", "198.18.2.10"].iter().map(|a| a.parse().expect("ip")).collect();
    balancer.set_local_addresses(gw.clone(), &mut dp).expect("mark");
    assert_eq!(dp.roles.get(&key("198.18.2.1")), Some(&ADDR_ROLE_LOCAL));
    assert_eq!(dp.roles.get(&key("2001:db8:2::1")), Some(&ADDR_ROLE_LOCAL));
    assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&(ADDR_ROLE_LOCAL | ADDR_ROLE_BACKEND)));
    // An address that went away loses its role; the backend keeps its own.
    balancer.set_local_addresses(gw[..1].to_vec(), &mut dp).expect("unmark");
    assert_eq!(dp.roles.get(&key("2001:db8:2::1")), None);
    assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&ADDR_ROLE_BACKEND));
    assert_eq!(dp.roles.get(&key("198.18.2.1")), Some(&ADDR_ROLE_LOCAL));
}

#[test]
fn every_backend_has_a_service_entry_naming_its_vip() {
    let config = config(SMALL_M, vec![equal_vip(3)]);
    let (_balancer, dp) = installed(&config);
    for (i, id) in (1..=3u32).enumerate() {
        let service = ServiceKey::new(addr(&format!("198.18.2.{}:8080", 10 + i)), lb_common::PROTO_TCP);
        let nat = dp.services.get(&service).unwrap_or_else(|| panic!("no service entry for backend {id}"));
        assert_eq!((nat.backend_id, nat.vip_id, u16::from_be(nat.vip_port_be)), (id, 1, 80));
    }
}

#[test]
fn a_service_two_vips_share_lists_both_and_marks_its_backends() {
    let mut other = equal_vip(2);
    other.name = "other".to_owned();
    other.listen = addr("198.18.0.11:80");
    let config = config(SMALL_M, vec![equal_vip(2), other]);
    let (_balancer, dp) = installed(&config);
    let service = ServiceKey::new(addr("198.18.2.10:8080"), lb_common::PROTO_TCP);
    let nat = dp.services.get(&service).expect("service entry");
    assert_ne!(nat.flags & lb_common::flow::SERVICE_F_SHARED, 0, "marked shared");
    let list = dp.shared.get(&service).expect("shared list");
    let listed: Vec<(u32, u32, u16)> = list.vips[..list.count as usize]
        .iter()
        .map(|n| (n.backend_id, n.vip_id, u16::from_be(n.vip_port_be)))
        .collect();
    // Backend ids count (VIP, backend) pairs: 1 and 2 in the first VIP, 3 and 4 in the other.
    assert_eq!(listed, vec![(1, 1, 80), (3, 2, 80)]);
    assert_eq!(list.vips[1].vip_addr_be, lb_common::addr::words("198.18.0.11".parse().expect("ip")));
    for id in [1, 2, 3, 4] {
        let info = dp.backends.get(&id).expect("backend written");
        assert_ne!(info.flags & lb_common::backend::BACKEND_F_SHARED, 0, "backend {id} marked shared");
    }
}
