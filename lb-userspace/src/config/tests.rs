use std::{path::Path, time::Duration};

use super::*;
use crate::control::balancer::Balancer;

const FILE: &str = "test.toml";

/// The example from the issue that asked for the config format.
const EXAMPLE: &str = r#"
[agent]
interfaces = ["eth0", "eth1"]
admin_listen = "127.0.0.1:7451"
xdp_mode = "native"
conntrack_capacity = 1048576

[[vip]]
name = "web"
listen = "198.18.0.100:80"
protocol = "tcp"

[vip.health_check]
type = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3
expect_status = "200-399"

[[vip.backend]]
address = "198.18.2.11:8080"
weight = 1
"#;

const MINIMAL: &str = r#"
[agent]
interfaces = ["eth0"]

[[vip]]
name = "web"
listen = "198.18.0.100:80"

[[vip.backend]]
address = "198.18.2.11:8080"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

/// The error line for `text`, which must be rejected.
fn error(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `text` is rejected at `key` with a reason containing `reason`.
fn rejects(text: &str, key: &str, reason: &str) {
    let e = error(text);
    let prefix = format!("{FILE}: {key}: ");
    assert!(e.starts_with(&prefix), "{e:?} does not start with {prefix:?}");
    assert!(e.contains(reason), "{e:?} does not say {reason:?}");
}

fn with_check(check: &str) -> String {
    MINIMAL.replace("[[vip.backend]]", &format!("[vip.health_check]\n{check}\n\n[[vip.backend]]"))
}

#[test]
fn the_issue_example_parses() {
    let config = parse(EXAMPLE).expect("valid");
    assert_eq!(config.agent.interfaces, ["eth0", "eth1"]);
    assert_eq!(config.agent.conntrack_capacity, 1_048_576);
    let vip = &config.vips[0];
    assert_eq!(vip.listen, "198.18.0.100:80".parse().expect("addr"));
    assert_eq!(vip.protocol, Protocol::Tcp);
    assert_eq!(
        vip.health_check,
        HealthCheckConfig {
            kind: HealthCheckKind::Http {
                path: "/health".into(),
                expect_status: StatusRange { min: 200, max: 399 },
                host: None,
                expect_body: None,
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            port: None,
        }
    );
    assert_eq!(
        vip.backends,
        [BackendConfig {
            address: "198.18.2.11:8080".parse().expect("addr"),
            weight: 1,
            backup: false,
            health_check: None
        }]
    );
    assert!(Balancer::new(&config).is_ok());
}

#[test]
fn defaults_are_filled() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.source, Path::new(FILE));
    let agent = &config.agent;
    assert_eq!(agent.admin_listen, DEFAULT_ADMIN_LISTEN);
    assert_eq!(agent.xdp_mode, XdpMode::Native);
    assert_eq!(agent.conntrack_capacity, lb_common::limits::DEFAULT_CONNTRACK_CAPACITY);
    assert_eq!(agent.ring_size, lb_common::limits::DEFAULT_RING_SIZE);
    assert_eq!(agent.max_vips, DEFAULT_MAX_VIPS);
    assert!(!agent.max_vips_set, "derived, not set");
    let vip = &config.vips[0];
    assert_eq!(vip.protocol, Protocol::Tcp);
    assert_eq!(vip.scheduler, Scheduler::Maglev);
    let check = &vip.health_check;
    assert_eq!(
        check.kind,
        HealthCheckKind::Http { path: "/".into(), expect_status: DEFAULT_EXPECT_STATUS, host: None, expect_body: None }
    );
    assert_eq!((check.interval, check.timeout, check.rise, check.fall), (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 2, 3));
    assert_eq!(vip.backends[0].weight, 1);
    assert!(!vip.backends[0].backup);
}

#[test]
fn timeout_defaults_to_at_most_the_interval() {
    let config = parse(&with_check("interval = \"300ms\"")).expect("valid");
    assert_eq!(config.vips[0].health_check.timeout, Duration::from_millis(300));
}

#[test]
fn syntax_errors_have_line_and_column_on_one_line() {
    let e = error("[agent]\ninterfaces = [\"eth0\"\n");
    assert!(e.starts_with(&format!("{FILE}:3:1: invalid array")), "{e}");
    assert!(e.contains("; expected `]`") && !e.contains('\n'), "{e:?}");
    let e = error("[agent]\ninterfaces = [\"eth0\"]\ninterfaces = [\"eth1\"]\n");
    assert!(e.starts_with(&format!("{FILE}:3:1: duplicate key `interfaces`")), "{e}");
    let e = error("[agent]\n  name = \"é\" x\n");
    assert!(e.starts_with(&format!("{FILE}:2:14: ")), "columns count characters: {e}");
}

/// Found by the config fuzzer (issue 12): toml gives no message for a value
/// cut off by the end of the file, or a lone carriage return in a comment,
/// which printed `FILE:3:14: ` and nothing.
#[test]
fn a_value_cut_off_at_the_end_of_the_file_says_so() {
    let e = error("\n[agent]\ninterfaces = ");
    assert_eq!(e, format!("{FILE}:3:14: unexpected end of file"));
    let e = error("[agent]\n# a comment \r with a lone carriage return\n");
    assert_eq!(e, format!("{FILE}:2:13: unexpected control character '\\r'"));
}

#[test]
fn unreadable_files_say_so_once() {
    let e = Config::load(Path::new("/nonexistent/lb.toml")).expect_err("no such file");
    let line = format!("{:#}", anyhow::Error::from(e));
    assert!(line.starts_with("/nonexistent/lb.toml: cannot read: "), "{line}");
    assert_eq!(line.matches("os error").count(), 1, "the cause is printed once: {line}");
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    rejects(&format!("{MINIMAL}\n[extra]\n"), "extra", "unknown key; expected one of: agent, announce, vip");
    rejects(&MINIMAL.replace("[agent]", "[agent]\ninterface = \"eth0\""), "agent.interface", "unknown key");
    rejects(&MINIMAL.replace("name = \"web\"", "name = \"web\"\nport = 80"), "vip[1] (web).port", "unknown key");
    rejects(&with_check("intervall = \"1s\""), "vip[1] (web).health_check.intervall", "unknown key");
    rejects(&format!("{MINIMAL}weigth = 2\n"), "vip[1] (web).backend[1].weigth", "unknown key");
}

/// Found by the config fuzzer (issue 12): a quoted key that is empty or
/// holds a dot was named `agent.` or `agent.a.b`; now it is quoted, as TOML
/// writes it.
#[test]
fn unknown_quoted_keys_are_named_quoted() {
    let with = |line: &str| MINIMAL.replace("[agent]", &format!("[agent]\n{line}"));
    rejects(&with("\"\" = 1"), "agent.\"\"", "unknown key");
    rejects(&with("\"a.b\" = 1"), "agent.\"a.b\"", "unknown key");
    rejects(&with("'a\"b' = 1"), "agent.\"a\\\"b\"", "unknown key");
    rejects(&with("\"tab\\there\" = 1"), "agent.\"tab\\u0009here\"", "unknown key");
}

#[test]
fn wrong_types_are_errors() {
    rejects(
        &MINIMAL.replace("[\"eth0\"]", "\"eth0\""),
        "agent.interfaces",
        "expected an array of strings, found a string",
    );
    rejects(
        &MINIMAL.replace("[\"eth0\"]", "[\"eth0\", 1]"),
        "agent.interfaces[2]",
        "expected a string, found an integer",
    );
    rejects(
        &format!("{MINIMAL}weight = \"heavy\"\n"),
        "vip[1] (web).backend[1].weight",
        "expected an integer, found a string",
    );
    rejects(&with_check("rise = 1.5"), "vip[1] (web).health_check.rise", "expected an integer, found a float");
    rejects(&MINIMAL.replace("[agent]", "agent = 1\n[x]"), "agent", "expected a table, found an integer");
}

#[test]
fn required_keys_and_sections() {
    rejects("[[vip]]\nname = \"web\"\n", "agent", "missing");
    rejects("[agent]\ninterfaces = [\"eth0\"]\n", "vip", "at least one");
    rejects(&MINIMAL.replace("interfaces = [\"eth0\"]", ""), "agent.interfaces", "missing (required)");
    rejects(&MINIMAL.replace("interfaces = [\"eth0\"]", "interfaces = []"), "agent.interfaces", "empty");
    rejects(&MINIMAL.replace("name = \"web\"", ""), "vip[1].name", "missing (required)");
    rejects(&MINIMAL.replace("listen = \"198.18.0.100:80\"", ""), "vip[1] (web).listen", "missing (required)");
    let no_backend = MINIMAL.split("[[vip.backend]]").next().unwrap_or_default().to_owned();
    rejects(&no_backend, "vip[1] (web).backend", "at least one");
    rejects(&MINIMAL.replace("address = \"198.18.2.11:8080\"", ""), "vip[1] (web).backend[1].address", "missing");
}

#[test]
fn agent_values_are_checked() {
    rejects(&MINIMAL.replace("\"eth0\"", "\"a-very-long-interface\""), "agent.interfaces[1]", "1 to 15 bytes");
    rejects(&MINIMAL.replace("\"eth0\"", "\"eth/0\""), "agent.interfaces[1]", "not an interface name");
    rejects(&MINIMAL.replace("\"eth0\"", "\"eth0\", \"eth0\""), "agent.interfaces[2]", "listed twice");
    let agent = |line: &str| MINIMAL.replace("[agent]", &format!("[agent]\n{line}"));
    rejects(&agent("admin_listen = \"localhost\""), "agent.admin_listen", "not an address and port");
    rejects(&agent("xdp_mode = \"offload\""), "agent.xdp_mode", "not one of: native, generic");
    rejects(&agent("conntrack_capacity = 10"), "agent.conntrack_capacity", "out of range");
    rejects(&agent("ring_size = 65536"), "agent.ring_size", "not prime");
    rejects(&agent("ring_size = 7"), "agent.ring_size", "out of range");
    rejects(&agent("max_vips = 0"), "agent.max_vips", "out of range");
    rejects(&agent("ring_size = 16777259\nmax_vips = 16"), "agent.max_vips", "at most 7 fit");
    rejects(&agent("ring_size = 134217689\nmax_vips = 2"), "agent.max_vips", "at most 1 fit");
    let config = parse(&agent("xdp_mode = \"generic\"\nring_size = 251\nmax_vips = 1")).expect("valid");
    assert_eq!((config.agent.xdp_mode, config.agent.ring_size, config.agent.max_vips), (XdpMode::Generic, 251, 1));
    assert!(config.agent.max_vips_set);
}

#[test]
fn operations_keys_have_defaults_and_are_checked() {
    let config = parse(MINIMAL).expect("valid");
    let agent = &config.agent;
    assert_eq!(agent.pin_dir, Path::new(DEFAULT_PIN_DIR));
    assert_eq!(agent.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert_eq!(agent.state_file, Path::new(DEFAULT_STATE_FILE));
    assert_eq!((&agent.control_group, agent.control_listen, &agent.control_token_file), (&None, None, &None));
    let with = |line: &str| MINIMAL.replace("[agent]", &format!("[agent]\n{line}"));
    rejects(&with("pin_dir = \"lb\""), "agent.pin_dir", "not an absolute path");
    rejects(&with("control_socket = \"lb.sock\""), "agent.control_socket", "not an absolute file path");
    rejects(&with("state_file = \"/\""), "agent.state_file", "not an absolute file path");
    rejects(&with("control_group = \"\""), "agent.control_group", "empty");
    rejects(&with("control_listen = \"127.0.0.1:9101\""), "agent.control_listen", "requires a bearer token");
    let config = parse(&with("control_listen = \"127.0.0.1:9101\"\ncontrol_token_file = \"/etc/lb/token\""))
        .expect("valid with a token file");
    assert_eq!(config.agent.control_token_file.as_deref(), Some(Path::new("/etc/lb/token")));
}

#[test]
fn vip_values_are_checked() {
    rejects(&MINIMAL.replace("\"web\"", "\"web site\""), "vip[1].name", "letters, digits");
    let down = |value: &str| MINIMAL.replace("name = \"web\"", &format!("name = \"web\"\non_backend_down = {value}"));
    rejects(&down("\"drop\""), "vip[1] (web).on_backend_down", "not one of: reschedule, keep");
    let kept = parse(&down("\"keep\"")).expect("valid");
    assert_eq!(kept.vips[0].on_backend_down, OnBackendDown::Keep);
    assert_eq!(parse(MINIMAL).expect("valid").vips[0].on_backend_down, OnBackendDown::Reschedule);
    let listen = |value: &str| MINIMAL.replace("\"198.18.0.100:80\"", value);
    rejects(
        &listen("\"198.18.0.300:80\""),
        "vip[1] (web).listen",
        "not an address and port (IPv4 \"198.18.0.100:80\" or IPv6",
    );
    rejects(&listen("\"198.18.0.100\""), "vip[1] (web).listen", "\"198.18.0.100\" has no port");
    rejects(&listen("\"198.18.0.100:0\""), "vip[1] (web).listen", "port 0");
    rejects(
        &MINIMAL.replace("name = \"web\"", "name = \"web\"\nprotocol = \"sctp\""),
        "vip[1] (web).protocol",
        "not one of: tcp, udp",
    );
}

#[test]
fn scheduler_is_named_or_refused() {
    let with = |line: &str| MINIMAL.replace("name = \"web\"", &format!("name = \"web\"\n{line}"));
    let config = parse(&with("scheduler = \"source-hash\"")).expect("valid");
    assert_eq!(config.vips[0].scheduler, Scheduler::SourceHash);
    assert_eq!(config.vips[0].scheduler.vip_flags(), lb_common::vip::VIP_F_SOURCE_HASH);
    let config = parse(&with("scheduler = \"maglev\"")).expect("valid");
    assert_eq!(config.vips[0].scheduler, Scheduler::Maglev);
    assert_eq!(config.vips[0].scheduler.vip_flags(), 0);
    let key = "vip[1] (web).scheduler";
    rejects(&with("scheduler = \"ip_hash\""), key, "\"ip_hash\" is not one of: maglev, source-hash");
    rejects(&with("scheduler = \"round-robin\""), key, "not one of: maglev, source-hash");
    rejects(&with("scheduler = 1"), key, "expected a string, found an integer");
}

#[test]
fn vips_are_unique() {
    let second = |name: &str, listen: &str| {
        format!(
            "{MINIMAL}\n[[vip]]\nname = \"{name}\"\nlisten = \"{listen}\"\n[[vip.backend]]\naddress = \"198.18.2.12:80\"\n"
        )
    };
    rejects(&second("web", "198.18.0.101:80"), "vip[2] (web).name", "used by an earlier VIP");
    rejects(
        &second("api", "198.18.0.100:80"),
        "vip[2] (api).listen",
        "tcp 198.18.0.100:80 is served by an earlier VIP",
    );
    let udp = second("dns", "198.18.0.100:80").replace("name = \"dns\"", "name = \"dns\"\nprotocol = \"udp\"").replace(
        "\n[[vip.backend]]\naddress = \"198.18.2.12:80\"",
        "\n[vip.health_check]\ntype = \"none\"\n[[vip.backend]]\naddress = \"198.18.2.12:80\"",
    );
    assert_eq!(parse(&udp).expect("same address and port over udp").vips[1].protocol, Protocol::Udp);
    rejects(
        &second("more", "198.18.0.101:80").replace("[agent]", "[agent]\nmax_vips = 1"),
        "agent.max_vips",
        "2 VIPs are configured",
    );
}

#[test]
fn health_check_values_are_checked() {
    let key = "vip[1] (web).health_check";
    rejects(&with_check("type = \"icmp\""), &format!("{key}.type"), "not one of: http, tcp, none");
    rejects(&with_check("type = \"tcp\"\npath = \"/x\""), &format!("{key}.path"), "only for type = \"http\"");
    rejects(&with_check("type = \"none\"\nexpect_status = \"200\""), &format!("{key}.expect_status"), "only for type");
    rejects(&with_check("path = \"health\""), &format!("{key}.path"), "must start with '/'");
    rejects(&with_check("path = \"/a b\""), &format!("{key}.path"), "no spaces");
    rejects(&with_check("host = \"a b\""), &format!("{key}.host"), "not a host name");
    rejects(&with_check("expect_status = \"200-99\""), &format!("{key}.expect_status"), "not a status or range");
    rejects(&with_check("expect_status = \"2xx\""), &format!("{key}.expect_status"), "not a status or range");
    rejects(&with_check("interval = \"soon\""), &format!("{key}.interval"), "not a duration");
    rejects(&with_check("interval = \"10ms\""), &format!("{key}.interval"), "out of range");
    rejects(&with_check("interval = \"1s\"\ntimeout = \"2s\""), &format!("{key}.timeout"), "at most the interval");
    rejects(&with_check("timeout = \"0s\""), &format!("{key}.timeout"), "above 0");
    rejects(&with_check("rise = 0"), &format!("{key}.rise"), "out of range (1 to 100)");
    rejects(&with_check("fall = 101"), &format!("{key}.fall"), "out of range");
    rejects(&with_check("port = 70000"), &format!("{key}.port"), "out of range");
    let check =
        parse(&with_check("type = \"tcp\"\nport = 9000\nexpect_status_x = 1").replace("expect_status_x = 1", ""))
            .expect("valid")
            .vips[0]
            .health_check
            .clone();
    assert_eq!((check.kind, check.port), (HealthCheckKind::Tcp, Some(9000)));
    let single = parse(&with_check("expect_status = \"204\"\nhost = \"example.org\"")).expect("valid");
    assert_eq!(
        single.vips[0].health_check.kind,
        HealthCheckKind::Http {
            path: "/".into(),
            expect_status: StatusRange { min: 204, max: 204 },
            host: Some("example.org".into()),
            expect_body: None,
        }
    );
}

#[test]
fn udp_vips_need_a_probe_port_or_no_checks() {
    let udp = MINIMAL.replace("name = \"web\"", "name = \"web\"\nprotocol = \"udp\"");
    rejects(&udp, "vip[1] (web).health_check", "set health_check.port or type = \"none\"");
    let with = |check: &str| udp.replace("[[vip.backend]]", &format!("[vip.health_check]\n{check}\n[[vip.backend]]"));
    assert!(parse(&with("type = \"none\"")).is_ok());
    assert!(parse(&with("port = 8080")).is_ok());
}

#[test]
fn backend_values_are_checked() {
    let key = "vip[1] (web).backend";
    rejects(
        &MINIMAL.replace("198.18.2.11:8080", "198.18.2.300:80"),
        &format!("{key}[1].address"),
        "not an address and port",
    );
    rejects(&format!("{MINIMAL}weight = 10001\n"), &format!("{key}[1].weight"), "out of range (0 to 10000)");
    rejects(&format!("{MINIMAL}weight = -1\n"), &format!("{key}[1].weight"), "out of range");
    rejects(
        &format!("{MINIMAL}\n[[vip.backend]]\naddress = \"198.18.2.11:8080\"\n"),
        &format!("{key}[2].address"),
        "listed twice",
    );
    let drained = parse(&format!("{MINIMAL}weight = 0\n")).expect("weight 0 drains");
    assert_eq!(drained.vips[0].backends[0].weight, 0);
    rejects(
        &format!("{MINIMAL}backup = \"yes\"\n"),
        &format!("{key}[1].backup"),
        "expected true or false, found a string",
    );
    rejects(&format!("{MINIMAL}backup = 1\n"), &format!("{key}[1].backup"), "expected true or false, found an integer");
}

#[test]
fn backup_backends_are_marked() {
    let text = format!(
        "{MINIMAL}\n[[vip.backend]]\naddress = \"198.18.2.12:8080\"\nbackup = true\n\n[[vip.backend]]\naddress = \"198.18.2.13:8080\"\nbackup = false\n"
    );
    let config = parse(&text).expect("valid");
    let backups: Vec<bool> = config.vips[0].backends.iter().map(|b| b.backup).collect();
    assert_eq!(backups, [false, true, false]);
    // A VIP of backups only is allowed: with no primary, its backups serve.
    let only = parse(&format!("{MINIMAL}backup = true\n")).expect("valid");
    assert!(only.vips[0].backends[0].backup);
    assert!(Balancer::new(&only).is_ok());
}

fn many_backends(n: usize) -> String {
    let mut text = MINIMAL.split("[[vip.backend]]").next().unwrap_or_default().to_owned();
    for i in 0..n {
        text.push_str(&format!("[[vip.backend]]\naddress = \"198.18.{}.{}:80\"\n", 2 + i / 250, i % 250 + 1));
    }
    text
}

#[test]
fn capacity_limits_are_checked_before_the_balancer_sees_them() {
    let max = lb_common::limits::MAX_BACKENDS as usize - 1;
    let config = parse(&many_backends(max)).expect("the most backends that fit");
    assert!(Balancer::new(&config).is_ok());
    rejects(&many_backends(max + 1), "vip", &format!("at most {max}"));
    let small_ring = many_backends(300).replace("[agent]", "[agent]\nring_size = 251");
    rejects(&small_ring, "vip[1] (web).backend", "do not fit agent.ring_size 251");

    let mut many_vips = String::from("[agent]\ninterfaces = [\"eth0\"]\nmax_vips = 1024\nring_size = 65521\n");
    for i in 0..1024 {
        many_vips.push_str(&format!(
            "[[vip]]\nname = \"v{i}\"\nlisten = \"198.18.0.1:{port}\"\n[[vip.backend]]\naddress = \"198.18.2.1:{port}\"\n",
            port = i + 1
        ));
    }
    let config = parse(&many_vips).expect("1024 VIPs fit");
    assert!(Balancer::new(&config).is_ok());
}

#[test]
fn the_shipped_example_is_valid() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/lb.toml"));
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.vips.len() >= 2, "the example shows a TCP and a UDP service");
    assert!(config.vips.iter().any(|v| v.listen.is_ipv6()), "the example shows an IPv6 service");
    assert!(Balancer::new(&config).is_ok());
}

/// Every example under examples/ loads, fits, and shows what its name says.
#[test]
fn every_example_is_valid_and_shows_its_case() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let load = |name: &str| {
        let config = Config::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
        assert!(Balancer::new(&config).is_ok(), "{name} fits the maps");
        config
    };
    assert_eq!(load("single-vip.toml").vips.len(), 1);
    let ports: Vec<u16> = load("multi-port.toml").vips.iter().map(|v| v.listen.port()).collect();
    assert_eq!(ports, [8000, 9000]);
    assert!(load("ipv6.toml").vips.iter().all(|v| v.listen.is_ipv6()));
    assert!(load("udp-dns.toml").vips.iter().all(|v| v.protocol.as_str() == "udp" && v.listen.port() == 53));
    let web = &load("drain-and-backup.toml").vips[0];
    assert!(web.backends.iter().any(|b| b.weight == 0) && web.backends.iter().any(|b| b.backup));
    let listed: usize = std::fs::read_dir(dir).expect("examples/").filter(|e| e.is_ok()).count();
    assert_eq!(listed, 6, "a new example gets a line here");
}

#[test]
fn vips_that_do_not_fit_the_ring_size_name_it_when_max_vips_is_not_set() {
    let two = format!(
        "{MINIMAL}\n[[vip]]\nname = \"api\"\nlisten = \"198.18.0.101:80\"\n[[vip.backend]]\naddress = \"198.18.2.12:80\"\n"
    );
    let big_ring = two.replace("[agent]", "[agent]\nring_size = 134217689");
    rejects(&big_ring, "agent.ring_size", "2 VIPs of ring_size 134217689 need 536870756 Maglev entries");
    let config = parse(&MINIMAL.replace("[agent]", "[agent]\nring_size = 134217689")).expect("one big ring fits");
    assert_eq!(config.agent.max_vips, 1, "the default max_vips shrinks to what fits");
}

#[test]
fn problems_are_reported_in_file_order() {
    let both = MINIMAL.replace("[agent]", "[agent]\nxdp_mode = \"fast\"").replace("\"web\"", "\"web site\"");
    rejects(&both, "agent.xdp_mode", "not one of");
    let typo_in_agent = MINIMAL.replace("[agent]", "[agent]\nring = 5").replace("[[vip.backend]]", "");
    rejects(&typo_in_agent, "agent.ring", "unknown key");
}

#[test]
fn default_max_vips_leaves_room_and_grows_with_the_vips() {
    let mut text = String::from("[agent]\ninterfaces = [\"eth0\"]\n");
    for i in 0..20 {
        text.push_str(&format!(
            "[[vip]]\nname = \"v{i}\"\nlisten = \"198.18.0.1:{port}\"\n[[vip.backend]]\naddress = \"198.18.2.1:{port}\"\n",
            port = i + 1
        ));
    }
    let config = parse(&text).expect("20 VIPs with the default ring fit");
    assert_eq!(config.agent.max_vips, 20);
    assert!(Balancer::new(&config).is_ok());
    assert_eq!(parse(MINIMAL).expect("valid").agent.max_vips, DEFAULT_MAX_VIPS);
}

/// A dual-stack config: the IPv4 VIP of [`MINIMAL`], then IPv6 TCP and UDP
/// VIPs on 2001:db8::100 over two IPv6 backends.
fn dual_stack() -> String {
    format!(
        "{MINIMAL}
[[vip]]
name = \"web6\"
listen = \"[2001:db8::100]:80\"

[[vip.backend]]
address = \"[2001:db8:2::11]:8080\"

[[vip.backend]]
address = \"[2001:db8:2::12]:8080\"
weight = 2

[[vip]]
name = \"echo6\"
listen = \"[2001:db8::100]:5353\"
protocol = \"udp\"

[vip.health_check]
port = 8080

[[vip.backend]]
address = \"[2001:db8:2::11]:8081\"
"
    )
}

#[test]
fn ipv6_vips_and_backends_are_accepted() {
    let config = parse(&dual_stack()).expect("valid");
    let [web, web6, echo6] = &config.vips[..] else { panic!("three VIPs: {:?}", config.vips) };
    assert!(web.listen.is_ipv4());
    assert_eq!(web6.listen, "[2001:db8::100]:80".parse().expect("addr"));
    let addresses: Vec<std::net::SocketAddr> = web6.backends.iter().map(|b| b.address).collect();
    let want: Vec<std::net::SocketAddr> =
        ["[2001:db8:2::11]:8080", "[2001:db8:2::12]:8080"].iter().map(|a| a.parse().expect("addr")).collect();
    assert_eq!(addresses, want);
    assert_eq!(web6.backends[1].weight, 2);
    assert_eq!((echo6.protocol, echo6.health_check.port), (Protocol::Udp, Some(8080)));
    // Probes go to the backend's IPv6 address, on the health port.
    let target = echo6.health_check.target(echo6.backends[0].address);
    assert_eq!(target, "[2001:db8:2::11]:8080".parse().expect("addr"));
    assert!(Balancer::new(&config).is_ok());
}

#[test]
fn ipv6_addresses_compare_as_addresses_not_text() {
    let spelled_twice =
        dual_stack().replacen("address = \"[2001:db8:2::12]:8080\"", "address = \"[2001:0db8:2:0::11]:8080\"", 1);
    rejects(&spelled_twice, "vip[2] (web6).backend[2].address", "[2001:db8:2::11]:8080 is listed twice");
    let same_listen =
        dual_stack().replace("[2001:db8::100]:5353", "[2001:db8:0::100]:80").replace("\"udp\"", "\"tcp\"");
    rejects(&same_listen, "vip[3] (echo6).listen", "tcp [2001:db8::100]:80 is served by an earlier VIP");
}

#[test]
fn a_vips_backends_must_be_of_its_family() {
    let v4_in_v6 = dual_stack().replacen("\"[2001:db8:2::12]:8080\"", "\"198.18.2.11:8080\"", 1);
    assert_eq!(
        error(&v4_in_v6),
        "test.toml: vip[2] (web6).backend[2].address: 198.18.2.11:8080 is IPv4 but the VIP listens on IPv6; \
         a VIP's backends must be of its family"
    );
    let v6_in_v4 = MINIMAL.replace("\"198.18.2.11:8080\"", "\"[2001:db8:2::11]:8080\"");
    rejects(
        &v6_in_v4,
        "vip[1] (web).backend[1].address",
        "[2001:db8:2::11]:8080 is IPv6 but the VIP listens on IPv4; a VIP's backends must be of its family",
    );
}

#[test]
fn ipv6_addresses_are_checked() {
    let listen = |value: &str| dual_stack().replacen("\"[2001:db8::100]:80\"", value, 1);
    let key = "vip[2] (web6).listen";
    rejects(&listen("\"[2001:db8::100]:0\""), key, "port 0 is not a port");
    rejects(&listen("\"[2001:db8::100]\""), key, "not an address and port");
    rejects(&listen("\"2001:db8::100\""), key, "is an IPv6 address without a port; write \"[ADDRESS]:PORT\"");
    rejects(&listen("\"[2001:db8::zz]:80\""), key, "not an address and port");
    rejects(&listen("\"[::]:80\""), key, ":: is the unspecified address; a VIP or backend needs a unicast address");
    rejects(&listen("\"[::1]:80\""), key, "::1 is the loopback address");
    rejects(&listen("\"[ff02::1]:80\""), key, "ff02::1 is a multicast address");
    rejects(&listen("\"[fe80::1]:80\""), key, "fe80::1 is link-local");
    rejects(&listen("\"[fe80::1%2]:80\""), key, "a zone index (%2) is not supported");
    rejects(&listen("\"[::ffff:198.18.0.100]:80\""), key, "IPv4-mapped (write the IPv4 address itself)");
    let backend = |value: &str| dual_stack().replacen("\"[2001:db8:2::11]:8080\"", value, 1);
    let key = "vip[2] (web6).backend[1].address";
    rejects(&backend("\"[fe80::11]:8080\""), key, "link-local");
    rejects(&backend("\"[2001:db8:2::11]:0\""), key, "port 0");
    // Unique local and global unicast are fine.
    assert!(parse(&backend("\"[fd00::11]:8080\"")).is_ok());
}

#[test]
fn ipv4_addresses_that_cannot_be_balanced_are_refused() {
    let listen = |value: &str| MINIMAL.replace("\"198.18.0.100:80\"", value);
    let key = "vip[1] (web).listen";
    rejects(&listen("\"0.0.0.0:80\""), key, "0.0.0.0 is the unspecified address");
    rejects(&listen("\"127.0.0.1:80\""), key, "127.0.0.1 is a loopback address");
    rejects(&listen("\"224.0.0.1:80\""), key, "224.0.0.1 is a multicast address");
    rejects(&listen("\"255.255.255.255:80\""), key, "the broadcast address");
}

#[test]
fn http_host_must_bracket_an_ipv6_literal() {
    let key = "vip[1] (web).health_check.host";
    rejects(
        &with_check("host = \"2001:db8::1\""),
        key,
        "\"2001:db8::1\" is an IPv6 address; a Host header needs brackets: \"[2001:db8::1]\"",
    );
    let bracketed = parse(&with_check("host = \"[2001:db8::1]\"")).expect("valid");
    assert!(
        matches!(&bracketed.vips[0].health_check.kind, HealthCheckKind::Http { host: Some(h), .. } if h == "[2001:db8::1]")
    );
}

/// One VIP for [`services`]: name, listen, protocol, backend addresses.
type VipSpec<'a> = (&'a str, &'a str, &'a str, &'a [&'a str]);

/// A config of `vips`, unchecked (`type = "none"`, so UDP VIPs need no probe
/// port).
fn services(vips: &[VipSpec<'_>]) -> String {
    let mut text = String::from("[agent]\ninterfaces = [\"eth0\"]\n");
    for (name, listen, protocol, backends) in vips {
        text.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\nlisten = \"{listen}\"\nprotocol = \"{protocol}\"\n[vip.health_check]\ntype = \"none\"\n"
        ));
        for backend in *backends {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{backend}\"\n"));
        }
    }
    text
}

#[test]
fn backends_that_loop_collide_or_cannot_be_reached_are_refused() {
    let cases: &[(&str, &[VipSpec<'_>], &str, &str)] = &[
        (
            "five udp VIPs sharing a backend",
            &[
                ("a", "198.18.0.100:5353", "udp", &["198.18.2.11:8081"]),
                ("b", "198.18.0.101:5353", "udp", &["198.18.2.11:8081"]),
                ("c", "198.18.0.102:5353", "udp", &["198.18.2.11:8081"]),
                ("d", "198.18.0.103:5353", "udp", &["198.18.2.11:8081"]),
                ("e", "198.18.0.104:5353", "udp", &["198.18.2.12:8081", "198.18.2.11:8081"]),
            ],
            "vip[5] (e).backend[2].address",
            "udp 198.18.2.11:8081 is also a backend of vip[1] (a), vip[2] (b), vip[3] (c), vip[4] (d); at most 4 VIPs",
        ),
        (
            "a backend equal to its own VIP",
            &[("web", "198.18.0.100:80", "tcp", &["198.18.2.11:8080", "198.18.0.100:80"])],
            "vip[1] (web).backend[2].address",
            "tcp 198.18.0.100:80 is this VIP's own listen address; a VIP cannot be its own backend (a loop)",
        ),
        (
            "two VIPs backing each other",
            &[
                ("a", "198.18.0.100:80", "tcp", &["198.18.0.101:80"]),
                ("b", "198.18.0.101:80", "tcp", &["198.18.0.100:80"]),
            ],
            "vip[1] (a).backend[1].address",
            "tcp 198.18.0.101:80 is the listen address of vip[2] (b); a backend cannot be a VIP",
        ),
        (
            "a backend that is a later VIP",
            &[
                ("a", "[2001:db8::100]:53", "udp", &["[2001:db8::101]:53"]),
                ("b", "[2001:db8::101]:53", "udp", &["[2001:db8:2::11]:53"]),
            ],
            "vip[1] (a).backend[1].address",
            "udp [2001:db8::101]:53 is the listen address of vip[2] (b)",
        ),
        (
            "a backend on a VIP's address and port, of the other protocol",
            &[
                ("a", "198.18.0.100:53", "tcp", &["198.18.2.11:53"]),
                ("b", "198.18.0.101:53", "udp", &["198.18.0.100:53"]),
            ],
            "vip[2] (b).backend[1].address",
            "198.18.0.100 is the address of vip[1] (a); a backend cannot live on a VIP's address",
        ),
        (
            "a backend on its own VIP's address, another port",
            &[("web", "[2001:db8::100]:80", "tcp", &["[2001:db8::100]:8080"])],
            "vip[1] (web).backend[1].address",
            "2001:db8::100 is the address of vip[1] (web)",
        ),
        (
            "a VIP in 0.0.0.0/8",
            &[("web", "0.1.2.3:80", "tcp", &["198.18.2.11:8080"])],
            "vip[1] (web).listen",
            "0.1.2.3 is in 0.0.0.0/8",
        ),
        (
            "a backend in 0.0.0.0/8",
            &[("web", "198.18.0.100:80", "tcp", &["0.0.0.11:8080"])],
            "vip[1] (web).backend[1].address",
            "0.0.0.11 is in 0.0.0.0/8",
        ),
        (
            "a VIP in 240.0.0.0/4",
            &[("web", "240.0.0.1:80", "tcp", &["198.18.2.11:8080"])],
            "vip[1] (web).listen",
            "240.0.0.1 is in 240.0.0.0/4",
        ),
        (
            "a backend in 240.0.0.0/4",
            &[("web", "198.18.0.100:80", "tcp", &["255.255.255.254:8080"])],
            "vip[1] (web).backend[1].address",
            "255.255.255.254 is in 240.0.0.0/4",
        ),
        (
            "a broadcast backend",
            &[("web", "198.18.0.100:80", "tcp", &["255.255.255.255:8080"])],
            "vip[1] (web).backend[1].address",
            "255.255.255.255 is the broadcast address",
        ),
        (
            "a multicast backend",
            &[("web", "198.18.0.100:80", "udp", &["239.255.255.250:1900"])],
            "vip[1] (web).backend[1].address",
            "239.255.255.250 is a multicast address",
        ),
        (
            "an IPv6 multicast VIP",
            &[("web", "[ff0e::1]:80", "tcp", &["[2001:db8:2::11]:8080"])],
            "vip[1] (web).listen",
            "ff0e::1 is a multicast address",
        ),
        (
            "an IPv6 multicast backend",
            &[("web", "[2001:db8::100]:80", "tcp", &["[ff02::1]:8080"])],
            "vip[1] (web).backend[1].address",
            "ff02::1 is a multicast address",
        ),
        (
            "an unspecified IPv6 backend",
            &[("web", "[2001:db8::100]:80", "tcp", &["[::]:8080"])],
            "vip[1] (web).backend[1].address",
            ":: is the unspecified address",
        ),
        (
            "an unspecified IPv4 backend",
            &[("web", "198.18.0.100:80", "tcp", &["0.0.0.0:8080"])],
            "vip[1] (web).backend[1].address",
            "0.0.0.0 is the unspecified address",
        ),
        (
            "an IPv4-compatible VIP",
            &[("web", "[::198.18.0.100]:80", "tcp", &["[2001:db8:2::11]:8080"])],
            "vip[1] (web).listen",
            "IPv4-compatible, a deprecated form (write the IPv4 address itself)",
        ),
        (
            "an IPv4-compatible backend",
            &[("web", "[2001:db8::100]:80", "tcp", &["[::198.18.2.11]:8080"])],
            "vip[1] (web).backend[1].address",
            "IPv4-compatible",
        ),
        (
            "an IPv4-mapped backend",
            &[("web", "[2001:db8::100]:80", "tcp", &["[::ffff:198.18.2.11]:8080"])],
            "vip[1] (web).backend[1].address",
            "IPv4-mapped (write the IPv4 address itself)",
        ),
    ];
    for (what, vips, key, reason) in cases {
        let e = error(&services(vips));
        let prefix = format!("{FILE}: {key}: ");
        assert!(e.starts_with(&prefix) && e.contains(reason), "{what}: {e:?} is not {prefix}...{reason}...");
        assert!(!e.contains('\n'), "{what}: one line: {e:?}");
    }
}

#[test]
fn backends_may_be_shared_across_protocols_and_sit_beside_a_vip() {
    let accepted: &[(&str, &[VipSpec<'_>])] = &[
        (
            "a tcp and a udp VIP on one backend address and port",
            &[
                ("dns-tcp", "198.18.0.100:53", "tcp", &["198.18.2.11:53"]),
                ("dns-udp", "198.18.0.100:53", "udp", &["198.18.2.11:53"]),
            ],
        ),
        (
            "two udp VIPs sharing a backend",
            &[
                ("a", "198.18.0.100:5353", "udp", &["198.18.2.11:8081"]),
                ("b", "198.18.0.101:5353", "udp", &["198.18.2.12:8081", "198.18.2.11:8081"]),
            ],
        ),
        (
            "four tcp VIPs sharing an IPv6 backend, written two ways",
            &[
                ("a", "[2001:db8::100]:80", "tcp", &["[2001:db8:2::11]:8080"]),
                ("b", "[2001:db8::100]:81", "tcp", &["[2001:db8:2:0::11]:8080"]),
                ("c", "[2001:db8::100]:82", "tcp", &["[2001:db8:2::11]:8080"]),
                ("d", "[2001:db8::100]:83", "tcp", &["[2001:db8:2::11]:8080"]),
            ],
        ),
        (
            "two VIPs on one backend host, on different ports",
            &[
                ("a", "198.18.0.100:80", "tcp", &["198.18.2.11:8080"]),
                ("b", "198.18.0.101:80", "tcp", &["198.18.2.11:8081"]),
            ],
        ),
        (
            "the edges of the refused IPv4 ranges",
            &[("a", "1.0.0.0:80", "tcp", &["223.255.255.254:8080", "1.0.0.1:8080"])],
        ),
    ];
    for (what, vips) in accepted {
        let config = parse(&services(vips)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(Balancer::new(&config).is_ok(), "{what}");
    }
}

fn with_limits(lines: &str) -> String {
    MINIMAL.replace("[[vip.backend]]", &format!("[vip.limits]\n{lines}\n\n[[vip.backend]]"))
}

#[test]
fn limits_parse_with_their_defaults() {
    let config = parse(&with_limits(
        "new_connections_per_second = 100\nburst = 200\nper = \"/24\"\nmax_connections_per_client = 50\n\
         action = \"rst\"\nallow = [\"198.18.9.0/24\", \"198.18.10.1/32\"]",
    ))
    .expect("valid");
    let limits = config.vips[0].limits.as_ref().expect("limits");
    assert_eq!((limits.rate, limits.burst, limits.max_connections), (Some(100), 200, Some(50)));
    assert_eq!((limits.prefix_len, limits.action, limits.allow.len()), (24, LimitAction::Rst, 2));
    let map = limits.to_map();
    assert_eq!((map.interval_ns, map.tolerance_ns, map.max_connections), (10_000_000, 2_000_000_000, 50));

    let config = parse(&with_limits("new_connections_per_second = 10")).expect("valid");
    let limits = config.vips[0].limits.as_ref().expect("limits");
    // A second's worth of burst, per address, dropped.
    assert_eq!((limits.burst, limits.prefix_len, limits.action), (10, 32, LimitAction::Drop));
    assert_eq!(limits.to_map().max_connections, 0);
    assert!(parse(MINIMAL).expect("valid").vips[0].limits.is_none());
}

#[test]
fn limits_are_checked_with_their_keys() {
    let key = |k: &str| format!("vip[1] (web).limits.{k}");
    rejects(&with_limits("burst = 5"), &key("burst"), "only with new_connections_per_second");
    rejects(&with_limits("per = \"/24\""), &key("new_connections_per_second"), "sets no limit");
    rejects(&with_limits("new_connections_per_second = 0"), &key("new_connections_per_second"), "");
    rejects(&with_limits("max_connections_per_client = 1\nper = \"/33\""), &key("per"), "\"/1\" to \"/32\"");
    rejects(&with_limits("max_connections_per_client = 1\nper = \"24\""), &key("per"), "is not \"address\"");
    rejects(&with_limits("max_connections_per_client = 1\naction = \"reject\""), &key("action"), "drop, rst");
    rejects(
        &with_limits("max_connections_per_client = 1\nallow = [\"198.18.9.1/24\"]"),
        &key("allow"),
        "bits set past",
    );
    rejects(
        &with_limits("max_connections_per_client = 1\nallow = [\"2001:db8::/32\"]"),
        &key("allow"),
        "is IPv6 but the VIP is IPv4",
    );
    rejects(&with_limits("max_connections_per_client = 1\nallow = [\"198.18.9.0\"]"), &key("allow"), "not a prefix");
    rejects(&with_limits("max_connections_per_client = 1\nrate = 5"), &key("rate"), "unknown");
}

#[test]
fn announce_is_optional_and_checked() {
    assert_eq!(parse(MINIMAL).expect("valid").announce, None);
    let with = |lines: &str| format!("{MINIMAL}\n[announce]\n{lines}\n");
    let config = parse(&with("routing_table = 100")).expect("valid");
    assert_eq!(config.announce, Some(AnnounceConfig { routing_table: 100, withdraw_delay: DEFAULT_WITHDRAW_DELAY }));
    rejects(&with("withdraw_delay = \"1s\""), "announce.routing_table", "missing");
    rejects(&with("routing_table = 254"), "announce.routing_table", "the kernel's own tables");
    rejects(&with("routing_table = 100\nwithdraw_delay = \"1h\""), "announce.withdraw_delay", "at most 5 minutes");
    rejects(&with("routing_table = 100\npeer = \"x\""), "announce.peer", "unknown key");
}

#[test]
fn timeouts_are_per_protocol_whole_seconds() {
    let with = |text: &str, lines: &str| {
        text.replace("[[vip.backend]]", &format!("[vip.timeouts]\n{lines}\n\n[[vip.backend]]"))
    };
    let config = parse(&with(MINIMAL, "tcp = \"1h\"\ntcp_closing = \"5s\"")).expect("valid");
    assert_eq!(config.vips[0].timeouts, TimeoutsConfig { idle_secs: Some(3600), closing_secs: Some(5) });
    assert_eq!(parse(MINIMAL).expect("valid").vips[0].timeouts.to_map(), lb_common::flow::FlowTimeouts::default());
    let key = |k: &str| format!("vip[1] (web).timeouts.{k}");
    rejects(&with(MINIMAL, "udp = \"10s\""), &key("udp"), "only for udp VIPs; this one is tcp");
    rejects(&with(MINIMAL, "tcp = \"1500ms\""), &key("tcp"), "whole seconds from 1s to 65535s");
    rejects(&with(MINIMAL, "tcp = \"1day\""), &key("tcp"), "whole seconds");
    rejects(&with(MINIMAL, "tcp = \"0s\""), &key("tcp"), "whole seconds");
    rejects(&with(MINIMAL, "tcp_idle = \"5s\""), &key("tcp_idle"), "unknown key");
}

/// MINIMAL as a UDP VIP, with `check` as its `[vip.health_check]`.
fn udp_with_check(check: &str) -> String {
    with_check(check).replace("name = \"web\"", "name = \"web\"\nprotocol = \"udp\"")
}

#[test]
fn https_checks_parse_with_verification_on_by_default() {
    let config = parse(&with_check("type = \"https\"\npath = \"/ready\"\nhost = \"api.lb.test\"")).expect("valid");
    assert_eq!(
        config.vips[0].health_check.kind,
        HealthCheckKind::Https {
            path: "/ready".into(),
            expect_status: DEFAULT_EXPECT_STATUS,
            host: Some("api.lb.test".into()),
            expect_body: None,
            tls: TlsCheck { sni: None, verify: true, ca_file: None },
        }
    );
    let insecure = parse(&with_check("type = \"https\"\nsni = \"b1.lb.test\"\ntls_verify = false")).expect("valid");
    let HealthCheckKind::Https { tls, .. } = &insecure.vips[0].health_check.kind else { panic!("https") };
    assert_eq!(tls, &TlsCheck { sni: Some("b1.lb.test".into()), verify: false, ca_file: None });
}

#[test]
fn https_keys_are_checked() {
    let key = "vip[1] (web).health_check";
    rejects(&with_check("type = \"https\"\nsni = \"198.18.2.11\""), &format!("{key}.sni"), "is not a DNS name");
    rejects(
        &with_check("type = \"https\"\ntls_verify = \"no\""),
        &format!("{key}.tls_verify"),
        "expected true or false",
    );
    rejects(
        &with_check("type = \"https\"\ntls_ca_file = \"/nonexistent/ca.pem\""),
        &format!("{key}.tls_ca_file"),
        "cannot read /nonexistent/ca.pem",
    );
    rejects(&with_check("type = \"https\"\ntls_ca_file = \"ca.pem\""), &format!("{key}.tls_ca_file"), "absolute path");
    rejects(
        &with_check("type = \"https\"\ntls_verify = false\ntls_ca_file = \"/etc/ca.pem\""),
        &format!("{key}.tls_ca_file"),
        "only with tls_verify = true",
    );
    rejects(&with_check("sni = \"a.lb.test\""), &format!("{key}.sni"), "only for type = \"https\", not \"http\"");
    rejects(
        &with_check("type = \"tcp\"\ntls_verify = true"),
        &format!("{key}.tls_verify"),
        "only for type = \"https\"",
    );
    rejects(&with_check("type = \"kerberos\""), &format!("{key}.type"), "not one of: http, tcp, none, https, dns");
}

#[test]
fn expect_body_is_for_http_and_https() {
    let key = "vip[1] (web).health_check";
    let config = parse(&with_check("expect_body = \"ready\"")).expect("valid");
    assert!(matches!(&config.vips[0].health_check.kind,
        HealthCheckKind::Http { expect_body: Some(text), .. } if text == "ready"));
    let config = parse(&with_check("type = \"https\"\nexpect_body = \"ready\"")).expect("valid");
    assert!(matches!(&config.vips[0].health_check.kind,
        HealthCheckKind::Https { expect_body: Some(text), .. } if text == "ready"));
    rejects(&with_check("expect_body = \"\""), &format!("{key}.expect_body"), "empty");
    rejects(
        &with_check(&format!("expect_body = \"{}\"", "x".repeat(1025))),
        &format!("{key}.expect_body"),
        "at most 1024",
    );
    rejects(
        &with_check("type = \"tcp\"\nexpect_body = \"ready\""),
        &format!("{key}.expect_body"),
        "only for type = \"http\" or \"https\", not \"tcp\"",
    );
}

#[test]
fn dns_checks_parse_and_need_no_port_on_udp() {
    let config = parse(&udp_with_check("type = \"dns\"\nquery_name = \"health.lb.test.\"")).expect("valid");
    let check = &config.vips[0].health_check;
    assert_eq!(
        check.kind,
        HealthCheckKind::Dns(DnsCheck { name: "health.lb.test".into(), qtype: DnsType(1), expect_answer: true })
    );
    assert_eq!(check.port, None, "the DNS service's own port");
    let config =
        parse(&udp_with_check("type = \"dns\"\nquery_name = \".\"\nquery_type = \"ns\"\nexpect_answer = false"))
            .expect("valid");
    assert_eq!(
        config.vips[0].health_check.kind,
        HealthCheckKind::Dns(DnsCheck { name: String::new(), qtype: DnsType(2), expect_answer: false })
    );
    assert_eq!(DnsType(28).to_string(), "AAAA");
    assert_eq!(DnsType(99).to_string(), "TYPE99");
}

#[test]
fn dns_keys_are_checked() {
    let key = "vip[1] (web).health_check";
    rejects(&udp_with_check("type = \"dns\""), &format!("{key}.query_name"), "missing: the name to query");
    rejects(&udp_with_check("type = \"dns\"\nquery_name = \"a..b\""), &format!("{key}.query_name"), "empty label");
    rejects(
        &udp_with_check("type = \"dns\"\nquery_name = \"a b.test\""),
        &format!("{key}.query_name"),
        "letters, digits",
    );
    let long = format!("{}.test", "a".repeat(64));
    rejects(
        &udp_with_check(&format!("type = \"dns\"\nquery_name = \"{long}\"")),
        &format!("{key}.query_name"),
        "63 bytes",
    );
    rejects(
        &udp_with_check("type = \"dns\"\nquery_name = \"a.test\"\nquery_type = \"AXFR\""),
        &format!("{key}.query_type"),
        "not one of: A, NS, CNAME",
    );
    rejects(
        &udp_with_check("type = \"tcp\"\nquery_name = \"a.test\""),
        &format!("{key}.query_name"),
        "only for type = \"dns\"",
    );
    // Over UDP, so a TCP VIP's backends need a probe port for it.
    rejects(&with_check("type = \"dns\"\nquery_name = \"a.test\""), key, "a dns check queries over UDP");
    assert!(parse(&with_check("type = \"dns\"\nquery_name = \"a.test\"\nport = 53")).is_ok());
}

/// MINIMAL with a VIP check and, for the backend, a check of its own.
fn with_backend_check(vip_check: &str, own: &str) -> String {
    format!("{}\n[vip.backend.health_check]\n{own}\n", with_check(vip_check))
}

#[test]
fn a_backend_check_inherits_the_vips_keys_it_does_not_set() {
    let text = with_backend_check(
        "path = \"/health\"\ninterval = \"5s\"\nrise = 4",
        "path = \"/ready\"\nexpect_body = \"ok\"",
    );
    let config = parse(&text).expect("valid");
    let vip = &config.vips[0];
    let own = vip.backends[0].health_check.as_ref().expect("its own check");
    assert_eq!((own.interval, own.rise), (Duration::from_secs(5), 4), "inherited");
    assert!(matches!(&own.kind, HealthCheckKind::Http { path, expect_body: Some(body), .. }
        if path == "/ready" && body == "ok"));
    assert!(
        matches!(&vip.health_check.kind, HealthCheckKind::Http { path, expect_body: None, .. } if path == "/health")
    );
    assert_eq!(vip.backends[0].check(&vip.health_check), own);
    // Another type keeps only the timing: no `path` is carried into a tcp check.
    let text = with_backend_check("path = \"/health\"\ninterval = \"5s\"", "type = \"tcp\"\nport = 9000");
    let own = parse(&text).expect("valid").vips[0].backends[0].health_check.clone().expect("own");
    assert_eq!((own.kind, own.interval, own.port), (HealthCheckKind::Tcp, Duration::from_secs(5), Some(9000)));
    // Without a table of its own, a backend follows its VIP.
    assert_eq!(parse(MINIMAL).expect("valid").vips[0].backends[0].health_check, None);
}

#[test]
fn a_backend_check_is_checked_at_its_own_key() {
    let key = "vip[1] (web).backend[1].health_check";
    rejects(&with_backend_check("", "path = \"x\""), &format!("{key}.path"), "must start with '/'");
    rejects(&with_backend_check("", "pth = \"/x\""), &format!("{key}.pth"), "unknown key");
    rejects(
        &with_backend_check("interval = \"1s\"", "timeout = \"2s\""),
        &format!("{key}.timeout"),
        "at most the interval",
    );
    rejects(&with_backend_check("type = \"tcp\"", "path = \"/x\""), &format!("{key}.path"), "only for type");
    let text = MINIMAL.replace("address = \"198.18.2.11:8080\"", "address = \"198.18.2.11:8080\"\nhealth_check = 3");
    rejects(&text, key, "expected a table, found an integer");
    // The transport rule holds for a backend's own check too.
    let udp = udp_with_check("type = \"dns\"\nquery_name = \"a.test\"");
    rejects(&format!("{udp}\n[vip.backend.health_check]\ntype = \"http\""), key, "set health_check.port");
    assert!(parse(&format!("{udp}\n[vip.backend.health_check]\nquery_type = \"AAAA\"")).is_ok());
}
