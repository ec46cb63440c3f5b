//! The testbed itself, without the load balancer: plain kernel forwarding
//! through the gateway, the backends' HTTP and UDP servers, backend
//! stop/start and health toggles, and cleanup. Needs root.

use std::{process::Command, thread};

use lb_tests::{Spread, Testbed};

/// Namespace names `ip netns list` shows right now.
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("running ip netns list");
    assert!(out.status.success(), "ip netns list failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn backends_answer_through_the_gateway_and_everything_is_removed() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let names: Vec<String> = testbed.namespaces().iter().map(|ns| ns.name().to_owned()).collect();
    let listed = netns_list();
    for name in &names {
        assert!(listed.contains(name), "namespace {name} missing from {listed:?}");
    }

    for i in 1..=3 {
        let want = testbed.backend_name(i);
        for new_connection_each in [true, false] {
            let results = testbed.client_requests(testbed.backend_http(i), 5, new_connection_each);
            let spread = Spread::of(&results);
            assert_eq!(
                spread.count(&want),
                5,
                "client -> {} (new conn {new_connection_each}): {spread}",
                testbed.backend_http(i)
            );
        }

        let health = testbed
            .http_get_in(testbed.gateway(), testbed.backend_http(i), "/health")
            .unwrap_or_else(|e| panic!("gateway -> {want} /health: {e:#}"));
        assert_eq!((health.status, health.text().as_str()), (200, "ok\n"), "{want} /health");
        assert_eq!(health.header("x-backend"), Some(want.as_str()));

        let payloads: [&[u8]; 3] = [b"one", b"two", b"three"];
        let results = testbed.client_udp(testbed.backend_udp(i), &payloads, 0);
        let spread = Spread::of(&results);
        assert_eq!(spread.count(&want), 3, "udp echo from {want}: {spread}");
    }

    let body = testbed.http_get(&format!("http://{}/big?bytes=100000", testbed.backend_http(1))).expect("GET /big");
    assert_eq!(body.len(), 100_000);

    // Nobody owns the VIP: without the load balancer the gateway has no route.
    let results = testbed.client_requests(testbed.vip_http(), 1, true);
    assert!(results[0].is_err(), "the VIP answered without a load balancer: {:?}", results[0].as_ref().ok());

    testbed.set_backend_health(2, false).expect("failing b2's health");
    let health = testbed.http_get_in(testbed.gateway(), testbed.backend_http(2), "/health").expect("GET /health");
    assert_eq!(health.status, 503, "b2 /health after /admin/health/fail");
    testbed.set_backend_health(2, true).expect("restoring b2's health");
    let health = testbed.http_get_in(testbed.gateway(), testbed.backend_http(2), "/health").expect("GET /health");
    assert_eq!(health.status, 200, "b2 /health after /admin/health/ok");

    testbed.stop_backend(3).expect("stopping b3");
    assert!(!testbed.backend_running(3).expect("checking b3"));
    let spread = Spread::of(&testbed.client_requests(testbed.backend_http(3), 2, true));
    assert_eq!(spread.errors, 2, "b3 answered while stopped: {spread}");
    testbed.start_backend(3).expect("restarting b3");
    let spread = Spread::of(&testbed.client_requests(testbed.backend_http(3), 2, true));
    assert_eq!(spread.count("b3"), 2, "b3 after restart: {spread}");

    drop(testbed);
    let listed = netns_list();
    for name in &names {
        assert!(!listed.contains(name), "namespace {name} still exists after drop");
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn backends_answer_over_ipv6_through_the_gateway() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    // nodad and accept_dad=0: nothing may wait for duplicate address detection.
    for ns in testbed.namespaces() {
        let addrs = ns.exec_ok(&["ip", "-6", "addr", "show"]).expect("ip -6 addr show");
        assert!(!addrs.contains("tentative"), "{}: addresses still tentative right after setup:\n{addrs}", ns.name());
    }
    assert_eq!(testbed.gateway().sysctl("net.ipv6.conf.all.forwarding").expect("reading forwarding"), "1");

    for i in 1..=2 {
        let want = testbed.backend_name(i);
        let spread = Spread::of(&testbed.client_requests(testbed.backend_http6(i), 3, true));
        assert_eq!(spread.count(&want), 3, "client -> {} over IPv6: {spread}", testbed.backend_http6(i));
        let echo = Spread::of(&testbed.client_udp(testbed.backend_udp6(i), &[b"six"], 0));
        assert_eq!(echo.count(&want), 1, "udp echo over IPv6 from {want}: {echo}");
        // What the agent's health checks do: from the gateway, over IPv6.
        let health = testbed
            .http_get_in(testbed.gateway(), testbed.backend_http6(i), "/health")
            .unwrap_or_else(|e| panic!("gateway -> {want} /health over IPv6: {e:#}"));
        assert_eq!(health.status, 200, "{want} /health over IPv6");
    }
    let body = testbed.http_get(&format!("http://{}/", testbed.backend_http6(1))).expect("GET over IPv6 by URL");
    assert_eq!(body, "backend=b1\n");

    // Nobody owns the IPv6 VIP either.
    let results = testbed.client_requests(testbed.vip6_http(), 1, true);
    assert!(results[0].is_err(), "the IPv6 VIP answered without a load balancer: {:?}", results[0].as_ref().ok());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn parallel_testbeds_do_not_collide() {
    lb_tests::require_root!();
    let ids: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let testbed = Testbed::new(2).expect("building a testbed");
                    for i in 1..=2 {
                        let spread = Spread::of(&testbed.client_requests(testbed.backend_http(i), 3, false));
                        assert_eq!(spread.count(&testbed.backend_name(i)), 3, "testbed {}: {spread}", testbed.id());
                    }
                    testbed.id().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("testbed thread panicked")).collect()
    });
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "testbed ids collide: {ids:?}");
    let listed = netns_list();
    for id in &ids {
        let prefix = format!("lbt{id}-");
        assert!(!listed.iter().any(|n| n.starts_with(&prefix)), "namespaces of {id} left: {listed:?}");
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn failed_construction_removes_what_it_made() {
    lb_tests::require_root!();
    // `false` starts and exits at once, so the first backend never listens:
    // the failure comes after every namespace and link exists.
    let err = Testbed::builder().backends(2).backend_bin("/bin/false").build().expect_err("a backend that exits");
    let message = format!("{err:#}");
    let id = message
        .split("setting up testbed ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no testbed id in {message:?}"));
    // Whether the exit or the closed stdout is seen first is a race; both
    // say the backend never listened.
    assert!(message.contains("before listening"), "unexpected error: {message}");
    let prefix = format!("lbt{id}-");
    let listed = netns_list();
    assert!(!listed.iter().any(|n| n.starts_with(&prefix)), "namespaces of {id} left: {listed:?}");
}
