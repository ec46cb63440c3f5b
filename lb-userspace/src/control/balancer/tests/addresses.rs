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
