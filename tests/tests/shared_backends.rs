//! End to end: two VIPs share one backend service (address, port and
//! protocol), and a client on a fixed source port (NTP, SIP, many DNS
//! clients) uses both. Replies carry no VIP, so the data path finds it from
//! the client's flow to each VIP (issue 10). Needs root.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
    testbed::{BACKEND_HTTP_PORT, client},
};

const BACKENDS: usize = 3;
/// The second UDP VIP, over the same backend servers as `echo`.
const ECHO2: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 101)), 5353);

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn two_vips_share_a_backend_and_a_client_on_one_port_uses_both() {
    lb_tests::require_root!();
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let check = HealthCheck::default();
    let mut config = agent::config_for(&testbed, check);
    let _ = writeln!(
        config,
        "[[vip]]\nname = \"echo2\"\nlisten = \"{ECHO2}\"\nprotocol = \"udp\"\n\n\
         [vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\nport = {BACKEND_HTTP_PORT}\n"
    );
    for i in 1..=BACKENDS {
        let _ = writeln!(config, "[[vip.backend]]\naddress = \"{}\"\n", testbed.backend_udp(i));
    }
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");
    for vip in ["echo", "echo2"] {
        agent.wait_health(vip, &["up"; BACKENDS], Duration::from_secs(10)).expect("backends up");
    }
    let echo = testbed.vip_udp();
    // One source port, to A, then B, then A again, several ports over: each
    // answer must come from the VIP its question went to (udp_exchange
    // checks the source), whichever backends the two flows landed on.
    for port in 41000..41010u16 {
        for (round, vip) in [echo, ECHO2, echo, ECHO2].into_iter().enumerate() {
            let answers = testbed.client().enter(|| client::udp_exchange(vip, &[b"q"], port));
            let answer = answers.expect("client namespace").expect("binding").pop().expect("one answer");
            assert!(answer.is_ok(), "port {port}, round {round}, to {vip}: {answer:?}");
        }
    }
    assert!(agent.verdict("drop_reply_no_flow") == 0, "a reply found no flow");
    assert!(agent.stop().expect("stopping lb"), "lb did not exit cleanly");
}
