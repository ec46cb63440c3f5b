//! Config reload (SIGHUP): what differs between the running config and a
//! freshly loaded one, as a list of [`Action`]s the balancer can apply in
//! place, or the first difference it cannot apply, as a [`Refusal`].
//!
//! A reload is all or nothing: one refused key refuses the whole file, and
//! the agent keeps running on the config it has.
//!
//! Applied in place (VIPs are matched by `name`, backends by `address`):
//! - VIPs added to the file: each gets the lowest free VIP id (which also
//!   selects its two Maglev rings, so ids stay within `agent.max_vips`), and
//!   is published once its ring is written (see [`crate::control::balancer`]);
//! - VIPs removed from the file: their `VIPS` entry goes first, so their
//!   packets pass to the kernel, then their backends are retired and their
//!   id is freed for a later VIP;
//! - a VIP whose `listen` or `protocol` changed is removed and added again
//!   under the same name: a different `VIPS` key is a different service to
//!   the data path, and its flows were pinned under the old one. A renamed
//!   VIP is removed and added too, since names are what match;
//! - a VIP's `scheduler`: only the hash that picks a new flow's slot changes
//!   (`VipInfo.flags`); flows already pinned stay where they are;
//! - a backend's `weight` (0 drains, above 0 undrains) and `backup` flag;
//! - backends added to or removed from an existing VIP. An added backend gets
//!   a fresh id, never one used before; a removed backend's id is retired: its
//!   `BACKENDS` entry is written `DOWN` once the ring no longer names it, so
//!   flows pinned to it move at their next packet (TCP ones get a reset from
//!   their new backend), and the id is never handed out again while the agent
//!   runs;
//! - a VIP's `[vip.health_check]` (its checkers restart with the new
//!   parameters; their first probe decides at once), and a backend's own
//!   `[vip.backend.health_check]` (only its checker restarts);
//! - a VIP's `[vip.limits]`: the new limits apply to the next new flow;
//!   clients' buckets and flow counts carry over.
//! - a VIP's `[vip.passive_health]`: the agent judges the next sample by
//!   it; failures already in a backend's window carry over.
//!
//! Removals are planned before everything else, so a VIP added under a
//! removed one's `listen` (a rename) or in its id (a full file) finds them
//! free.
//!
//! Refused, because they need a restart: every `[agent]` key, and more VIPs
//! than the running `agent.max_vips` (it sizes the Maglev array). A file that
//! leaves `max_vips` to its default keeps the running value.

use std::{fmt, net::SocketAddr, path::PathBuf};

use crate::config::model::{
    AgentConfig, BackendConfig, Config, HealthCheckConfig, LimitsConfig, OnBackendDown, PassiveHealthConfig, Protocol,
    Scheduler, TimeoutsConfig, VipConfig,
};

/// One change a reload applies in place.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A VIP no longer in the file (or whose `listen` or `protocol` changed).
    RemoveVip {
        vip: String,
        listen: SocketAddr,
        protocol: Protocol,
    },
    /// A VIP new to the file (or re-added with a new `listen` or `protocol`).
    AddVip {
        vip: VipConfig,
    },
    SetScheduler {
        vip: String,
        from: Scheduler,
        to: Scheduler,
    },
    SetWeight {
        vip: String,
        address: SocketAddr,
        from: u32,
        to: u32,
    },
    SetBackup {
        vip: String,
        address: SocketAddr,
        from: bool,
        to: bool,
    },
    AddBackend {
        vip: String,
        backend: BackendConfig,
    },
    RemoveBackend {
        vip: String,
        address: SocketAddr,
    },
    SetHealthCheck {
        vip: String,
        check: HealthCheckConfig,
    },
    /// A backend's own `[vip.backend.health_check]` set, changed or removed
    /// (`None`: it follows its VIP's again); only its checker restarts.
    SetBackendHealthCheck {
        vip: String,
        address: SocketAddr,
        check: Option<HealthCheckConfig>,
    },
    /// New `[vip.limits]` (`None`: removed). Clients' buckets and counts
    /// are kept: a client mid-burst stays mid-burst.
    SetLimits {
        vip: String,
        to: Option<LimitsConfig>,
    },
    SetOnBackendDown {
        vip: String,
        from: OnBackendDown,
        to: OnBackendDown,
    },
    /// New `[vip.timeouts]`, for flows opened from then on.
    SetTimeouts {
        vip: String,
        to: TimeoutsConfig,
    },
    /// New `[vip.passive_health]` (`None`: off). The agent's, not the
    /// balancer's: its failure windows carry over.
    SetPassiveHealth {
        vip: String,
        to: Option<PassiveHealthConfig>,
    },
}

impl Action {
    /// The name of the VIP it changes.
    pub fn vip(&self) -> &str {
        match self {
            Action::AddVip { vip } => &vip.name,
            Action::RemoveVip { vip, .. }
            | Action::SetScheduler { vip, .. }
            | Action::SetWeight { vip, .. }
            | Action::SetBackup { vip, .. }
            | Action::AddBackend { vip, .. }
            | Action::RemoveBackend { vip, .. }
            | Action::SetHealthCheck { vip, .. }
            | Action::SetBackendHealthCheck { vip, .. }
            | Action::SetLimits { vip, .. }
            | Action::SetOnBackendDown { vip, .. }
            | Action::SetTimeouts { vip, .. }
            | Action::SetPassiveHealth { vip, .. } => vip,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::RemoveVip { vip, listen, protocol } => {
                write!(f, "vip {vip} removed ({listen} {})", protocol.as_str())
            }
            Action::AddVip { vip } => write!(
                f,
                "vip {} added ({} {}, {}, {} backends)",
                vip.name,
                vip.listen,
                vip.protocol.as_str(),
                vip.scheduler.as_str(),
                vip.backends.len()
            ),
            Action::SetScheduler { vip, from, to } => {
                write!(f, "vip {vip} scheduler {} -> {}", from.as_str(), to.as_str())
            }
            Action::SetWeight { vip, address, from, to } => {
                write!(f, "vip {vip} backend {address} weight {from} -> {to}")
            }
            Action::SetBackup { vip, address, from, to } => {
                write!(f, "vip {vip} backend {address} backup {from} -> {to}")
            }
            Action::AddBackend { vip, backend } => write!(
                f,
                "vip {vip} backend {} added (weight {}, backup {})",
                backend.address, backend.weight, backend.backup
            ),
            Action::RemoveBackend { vip, address } => write!(f, "vip {vip} backend {address} removed"),
            Action::SetHealthCheck { vip, .. } => write!(f, "vip {vip} health_check changed, checkers restarted"),
            Action::SetBackendHealthCheck { vip, address, check: Some(_) } => {
                write!(f, "vip {vip} backend {address} health_check changed, its checker restarted")
            }
            Action::SetBackendHealthCheck { vip, address, check: None } => {
                write!(f, "vip {vip} backend {address} health_check removed, it follows the vip's")
            }
            Action::SetLimits { vip, to: Some(_) } => {
                write!(f, "vip {vip} limits changed (clients' buckets and counts kept)")
            }
            Action::SetLimits { vip, to: None } => write!(f, "vip {vip} limits removed"),
            Action::SetTimeouts { vip, .. } => write!(f, "vip {vip} timeouts changed (for flows opened from now on)"),
            Action::SetPassiveHealth { vip, to: Some(p) } => write!(
                f,
                "vip {vip} passive_health max_fails {} fail_timeout {}",
                p.max_fails,
                humantime::format_duration(p.fail_timeout)
            ),
            Action::SetPassiveHealth { vip, to: None } => write!(f, "vip {vip} passive_health off"),
            Action::SetOnBackendDown { vip, from, to } => {
                write!(f, "vip {vip} on_backend_down {} -> {}", from.as_str(), to.as_str())
            }
        }
    }
}

/// The first difference a reload cannot apply: `FILE: KEY: REASON`, like a
/// config error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct Refusal {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

/// The actions that turn `running` into `new`: every VIP removal first (in
/// the running file's order), then `new`'s VIPs in file order, each with its
/// in-place changes or as an addition. Or the first difference that needs a
/// restart.
///
/// # Errors
///
/// A [`Refusal`] naming the `[agent]` key.
pub fn reload(running: &Config, new: &Config) -> Result<Vec<Action>, Refusal> {
    let refuse = |key: String, reason: String| Refusal { file: new.source.clone(), key, reason };
    if let Some(key) = changed_agent_key(&running.agent, &new.agent) {
        return Err(refuse(format!("agent.{key}"), "changed; changing it needs a restart".to_owned()));
    }
    if running.announce != new.announce {
        return Err(refuse("announce".to_owned(), "changed; changing it needs a restart".to_owned()));
    }
    if let Some(reason) = max_vips_problem(&running.agent, new) {
        return Err(refuse("agent.max_vips".to_owned(), reason));
    }
    let mut actions: Vec<Action> = running
        .vips
        .iter()
        .filter(|old| !new.vips.iter().any(|vip| vip.name == old.name && same_service(old, vip)))
        .map(|old| Action::RemoveVip { vip: old.name.clone(), listen: old.listen, protocol: old.protocol })
        .collect();
    for vip in &new.vips {
        match running.vips.iter().find(|old| old.name == vip.name) {
            Some(old) if same_service(old, vip) => vip_actions(old, vip, &mut actions),
            _ => actions.push(Action::AddVip { vip: vip.clone() }),
        }
    }
    Ok(actions)
}

/// The config the agent runs on once `new` is applied: `new`, with the
/// `max_vips` its maps were sized for. (A file that leaves `max_vips` to its
/// default derives it from its VIP count, which no reload can apply.)
#[must_use]
pub fn as_running(running: &Config, mut new: Config) -> Config {
    new.agent.max_vips = running.agent.max_vips;
    new
}

/// Whether two VIPs of one name are the same service to the data path: the
/// same `VIPS` key. Anything else about them can change in place.
fn same_service(old: &VipConfig, new: &VipConfig) -> bool {
    old.listen == new.listen && old.protocol == new.protocol
}

fn vip_actions(old: &VipConfig, new: &VipConfig, actions: &mut Vec<Action>) {
    let vip = || new.name.clone();
    if old.scheduler != new.scheduler {
        actions.push(Action::SetScheduler { vip: vip(), from: old.scheduler, to: new.scheduler });
    }
    if old.limits != new.limits {
        actions.push(Action::SetLimits { vip: vip(), to: new.limits.clone() });
    }
    if old.timeouts != new.timeouts {
        actions.push(Action::SetTimeouts { vip: vip(), to: new.timeouts });
    }
    if old.passive_health != new.passive_health {
        actions.push(Action::SetPassiveHealth { vip: vip(), to: new.passive_health });
    }
    for backend in &old.backends {
        if !new.backends.iter().any(|b| b.address == backend.address) {
            actions.push(Action::RemoveBackend { vip: vip(), address: backend.address });
        }
    }
    for backend in &new.backends {
        let Some(was) = old.backends.iter().find(|b| b.address == backend.address) else {
            actions.push(Action::AddBackend { vip: vip(), backend: backend.clone() });
            continue;
        };
        if was.weight != backend.weight {
            actions.push(Action::SetWeight {
                vip: vip(),
                address: backend.address,
                from: was.weight,
                to: backend.weight,
            });
        }
        if was.backup != backend.backup {
            actions.push(Action::SetBackup {
                vip: vip(),
                address: backend.address,
                from: was.backup,
                to: backend.backup,
            });
        }
        if was.health_check != backend.health_check {
            actions.push(Action::SetBackendHealthCheck {
                vip: vip(),
                address: backend.address,
                check: backend.health_check.clone(),
            });
        }
    }
    if old.health_check != new.health_check {
        actions.push(Action::SetHealthCheck { vip: vip(), check: new.health_check.clone() });
    }
    if old.on_backend_down != new.on_backend_down {
        actions.push(Action::SetOnBackendDown { vip: vip(), from: old.on_backend_down, to: new.on_backend_down });
    }
}

/// The first `[agent]` key that differs, `max_vips` aside (see
/// [`max_vips_problem`]).
fn changed_agent_key(old: &AgentConfig, new: &AgentConfig) -> Option<&'static str> {
    let AgentConfig {
        interfaces,
        admin_listen,
        xdp_mode,
        conntrack_capacity,
        ring_size,
        max_vips: _,
        max_vips_set: _,
        pin_dir,
        control_socket,
        control_group,
        control_listen,
        control_token_file,
        state_file,
    } = old;
    [
        ("interfaces", *interfaces != new.interfaces),
        ("admin_listen", *admin_listen != new.admin_listen),
        ("xdp_mode", *xdp_mode != new.xdp_mode),
        ("conntrack_capacity", *conntrack_capacity != new.conntrack_capacity),
        ("ring_size", *ring_size != new.ring_size),
        ("pin_dir", *pin_dir != new.pin_dir),
        ("control_socket", *control_socket != new.control_socket),
        ("control_group", *control_group != new.control_group),
        ("control_listen", *control_listen != new.control_listen),
        ("control_token_file", *control_token_file != new.control_token_file),
        ("state_file", *state_file != new.state_file),
    ]
    .into_iter()
    .find_map(|(key, changed)| changed.then_some(key))
}

/// Why `new` cannot run in maps sized for `running.max_vips`, if it cannot:
/// it sets another `max_vips`, or has more VIPs than there are ids (each id
/// owns two rings of the Maglev array, which is as large as it was loaded).
fn max_vips_problem(running: &AgentConfig, new: &Config) -> Option<String> {
    if new.agent.max_vips_set && new.agent.max_vips != running.max_vips {
        return Some("changed; changing it needs a restart".to_owned());
    }
    let count = new.vips.len();
    (count > running.max_vips as usize).then(|| {
        format!(
            "{count} VIPs are configured, but the running agent has room for {} (its max_vips sizes the \
             Maglev array); raising it needs a restart",
            running.max_vips
        )
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = r#"
[agent]
interfaces = ["veth-a", "veth-b"]

[[vip]]
name = "web"
listen = "198.18.0.100:80"
[vip.health_check]
type = "http"
path = "/health"
[[vip.backend]]
address = "198.18.2.11:8080"
[[vip.backend]]
address = "198.18.2.12:8080"

[[vip]]
name = "dns"
listen = "198.18.0.100:5353"
protocol = "udp"
[vip.health_check]
type = "none"
[[vip.backend]]
address = "198.18.2.11:8081"
"#;

    fn load(text: &str) -> Config {
        Config::parse(text, Path::new("lb.toml")).unwrap_or_else(|e| panic!("test config: {e}"))
    }

    fn plan_for(new: &str) -> Result<Vec<Action>, Refusal> {
        reload(&load(BASE), &load(new))
    }

    fn refused_key(new: &str) -> String {
        match plan_for(new) {
            Err(refusal) => refusal.key,
            Ok(actions) => panic!("accepted: {actions:?}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_same_config_plans_nothing() {
        assert_eq!(plan_for(BASE), Ok(vec![]));
        // Reordering VIPs changes nothing either: they are matched by name.
        let (head, tail) = BASE.split_at(BASE.find("[[vip]]\nname = \"dns\"").unwrap_or(0));
        let (agent, web) = head.split_at(head.find("[[vip]]").unwrap_or(0));
        assert_eq!(plan_for(&format!("{agent}{tail}\n{web}")), Ok(vec![]));
    }

    #[test]
    fn weight_and_backup_changes_are_planned() {
        let new = BASE.replacen(
            "address = \"198.18.2.12:8080\"",
            "address = \"198.18.2.12:8080\"\nweight = 0\nbackup = true",
            1,
        );
        let actions = plan_for(&new).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            actions,
            vec![
                Action::SetWeight { vip: "web".into(), address: addr("198.18.2.12:8080"), from: 1, to: 0 },
                Action::SetBackup { vip: "web".into(), address: addr("198.18.2.12:8080"), from: false, to: true },
            ]
        );
        assert_eq!(actions[0].to_string(), "vip web backend 198.18.2.12:8080 weight 1 -> 0");
    }

    #[test]
    fn backends_added_and_removed_are_planned() {
        let new = BASE.replacen("198.18.2.12:8080", "198.18.2.13:8080", 1);
        assert_eq!(
            plan_for(&new),
            Ok(vec![
                Action::RemoveBackend { vip: "web".into(), address: addr("198.18.2.12:8080") },
                Action::AddBackend {
                    vip: "web".into(),
                    backend: BackendConfig {
                        address: addr("198.18.2.13:8080"),
                        weight: 1,
                        backup: false,
                        health_check: None
                    }
                },
            ])
        );
    }

    #[test]
    fn health_check_changes_are_planned() {
        let new = BASE.replacen("path = \"/health\"", "path = \"/health\"\ninterval = \"5s\"", 1);
        let actions = plan_for(&new).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&actions[..], [Action::SetHealthCheck { vip, check }]
            if vip == "web" && check.interval == std::time::Duration::from_secs(5)));
    }

    #[test]
    fn a_backends_own_check_is_planned_for_that_backend_alone() {
        let own = "address = \"198.18.2.12:8080\"\n[vip.backend.health_check]\ntype = \"tcp\"";
        let with_own = BASE.replacen("address = \"198.18.2.12:8080\"", own, 1);
        let actions = plan_for(&with_own).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&actions[..], [Action::SetBackendHealthCheck { vip, address, check: Some(check) }]
            if vip == "web" && *address == addr("198.18.2.12:8080") && check.kind == crate::config::model::HealthCheckKind::Tcp));
        assert_eq!(
            actions[0].to_string(),
            "vip web backend 198.18.2.12:8080 health_check changed, its checker restarted"
        );
    }

    #[test]
    fn passive_health_changes_are_planned_and_said() {
        let with = BASE.replacen(
            "path = \"/health\"",
            "path = \"/health\"\n[vip.passive_health]\nmax_fails = 3\nfail_timeout = \"10s\"",
            1,
        );
        let on = plan_for(&with).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on.len(), 1, "{on:?}");
        assert_eq!(on[0].to_string(), "vip web passive_health max_fails 3 fail_timeout 10s");
        let off = reload(&load(&with), &load(BASE)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off, vec![Action::SetPassiveHealth { vip: "web".into(), to: None }]);
        assert_eq!(off[0].to_string(), "vip web passive_health off");
    }

    #[test]
    fn agent_keys_need_a_restart() {
        for (from, to, key) in [
            ("\"veth-b\"]", "\"veth-c\"]", "agent.interfaces"),
            ("\"veth-b\"]", "\"veth-b\"]\nadmin_listen = \"127.0.0.1:9999\"", "agent.admin_listen"),
            ("\"veth-b\"]", "\"veth-b\"]\nxdp_mode = \"generic\"", "agent.xdp_mode"),
            ("\"veth-b\"]", "\"veth-b\"]\nconntrack_capacity = 4096", "agent.conntrack_capacity"),
            ("\"veth-b\"]", "\"veth-b\"]\nring_size = 4099", "agent.ring_size"),
            ("\"veth-b\"]", "\"veth-b\"]\nmax_vips = 4", "agent.max_vips"),
        ] {
            let new = BASE.replacen(from, to, 1);
            assert_eq!(refused_key(&new), key);
        }
        let refusal = plan_for(&BASE.replacen("veth-b", "veth-c", 1)).err();
        assert_eq!(
            refusal.map(|r| r.to_string()),
            Some("lb.toml: agent.interfaces: changed; changing it needs a restart".to_owned())
        );
    }

    /// The names of the VIPs `actions` remove and add, in order.
    fn vip_changes(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::RemoveVip { vip, .. } => Some(format!("-{vip}")),
                Action::AddVip { vip } => Some(format!("+{}", vip.name)),
                _ => None,
            })
            .collect()
    }

    const MORE: &str =
        "\n[[vip]]\nname = \"more\"\nlisten = \"198.18.0.100:81\"\n[[vip.backend]]\naddress = \"198.18.2.13:8080\"\n";

    #[test]
    fn vips_added_and_removed_are_planned() {
        let added = plan_for(&format!("{BASE}{MORE}")).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&added[..], [Action::AddVip { vip }] if vip.name == "more" && vip.backends.len() == 1));
        assert_eq!(added[0].to_string(), "vip more added (198.18.0.100:81 tcp, maglev, 1 backends)");

        let without_dns = &BASE[..BASE.find("[[vip]]\nname = \"dns\"").unwrap_or(BASE.len())];
        let removed = plan_for(without_dns).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            removed,
            vec![Action::RemoveVip { vip: "dns".into(), listen: addr("198.18.0.100:5353"), protocol: Protocol::Udp }]
        );
        assert_eq!(removed[0].to_string(), "vip dns removed (198.18.0.100:5353 udp)");

        // Removals come first, whatever the file order: the additions may need
        // their ids and keys.
        let swapped = format!("{without_dns}{MORE}");
        assert_eq!(vip_changes(&plan_for(&swapped).unwrap_or_else(|e| panic!("{e}"))), ["-dns", "+more"]);
    }

    #[test]
    fn a_new_listen_or_protocol_is_a_new_service_and_a_new_name_too() {
        let moved =
            plan_for(&BASE.replacen("198.18.0.100:80\"", "198.18.0.101:80\"", 1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vip_changes(&moved), ["-web", "+web"]);
        assert!(matches!(&moved[1], Action::AddVip { vip } if vip.listen == addr("198.18.0.101:80")));
        let retyped =
            plan_for(&BASE.replacen("protocol = \"udp\"", "protocol = \"tcp\"", 1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vip_changes(&retyped), ["-dns", "+dns"]);
        // Renaming is removing one VIP and adding another, at the same listen.
        let renamed = plan_for(&BASE.replacen("\"dns\"", "\"dns2\"", 1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vip_changes(&renamed), ["-dns", "+dns2"]);
    }

    #[test]
    fn a_new_scheduler_is_changed_in_place() {
        let new = BASE.replacen(
            "listen = \"198.18.0.100:80\"",
            "listen = \"198.18.0.100:80\"\nscheduler = \"source-hash\"",
            1,
        );
        let actions = plan_for(&new).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            actions,
            vec![Action::SetScheduler { vip: "web".into(), from: Scheduler::Maglev, to: Scheduler::SourceHash }]
        );
        assert_eq!(actions[0].to_string(), "vip web scheduler maglev -> source-hash");
    }

    #[test]
    fn more_vips_than_the_running_max_vips_need_a_restart() {
        // BASE leaves max_vips to its default, 16: room for 16 VIPs.
        let many: String = (0..15)
            .map(|i| format!("\n[[vip]]\nname = \"v{i}\"\nlisten = \"198.18.0.101:{port}\"\n[[vip.backend]]\naddress = \"198.18.2.11:{port}\"\n", port = i + 1))
            .collect();
        let seventeen = format!("{BASE}{many}");
        let refusal = plan_for(&seventeen).err();
        assert_eq!(
            refusal.map(|r| r.to_string()),
            Some(
                "lb.toml: agent.max_vips: 17 VIPs are configured, but the running agent has room for 16 (its \
                 max_vips sizes the Maglev array); raising it needs a restart"
                    .to_owned()
            )
        );
        // Sixteen fit, although their file alone would derive the same 16.
        let sixteen = &seventeen[..seventeen.rfind("\n[[vip]]").unwrap_or(0)];
        assert_eq!(plan_for(sixteen).map(|a| a.len()), Ok(14));

        // A running agent sized for 20 keeps its 20 when the file shrinks to
        // 2 VIPs and its default would say 16.
        let running = load(&format!("{BASE}{many}{MORE}").replacen("[agent]", "[agent]\nmax_vips = 20", 1));
        let small = load(BASE);
        assert_eq!(small.agent.max_vips, 16);
        assert!(reload(&running, &small).is_ok());
        assert_eq!(as_running(&running, small).agent.max_vips, 20);
        // Setting it explicitly to what runs is no change; to anything else is.
        let explicit = BASE.replacen("[agent]", "[agent]\nmax_vips = 16", 1);
        assert_eq!(plan_for(&explicit), Ok(vec![]));
        assert_eq!(refused_key(&BASE.replacen("[agent]", "[agent]\nmax_vips = 17", 1)), "agent.max_vips");
    }

    #[test]
    fn ipv6_backends_are_matched_by_address_not_spelling() {
        let web6 = "\n[[vip]]\nname = \"web6\"\nlisten = \"[2001:db8::100]:80\"\n\
                    [[vip.backend]]\naddress = \"[2001:db8:2::11]:8080\"\n\
                    [[vip.backend]]\naddress = \"[2001:db8:2::12]:8080\"\n";
        let old = load(&format!("{BASE}{web6}"));
        // The same addresses written out in full, one drained.
        let respelled = web6
            .replace("[2001:db8:2::11]", "[2001:0db8:0002:0000:0000:0000:0000:0011]")
            .replace("\"[2001:db8:2::12]:8080\"", "\"[2001:db8:2:0::12]:8080\"\nweight = 0");
        let actions = reload(&old, &load(&format!("{BASE}{respelled}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            actions,
            vec![Action::SetWeight { vip: "web6".into(), address: addr("[2001:db8:2::12]:8080"), from: 1, to: 0 }]
        );
        assert_eq!(actions[0].to_string(), "vip web6 backend [2001:db8:2::12]:8080 weight 1 -> 0");
        let moved = web6.replacen("[2001:db8::100]:80", "[2001:db8::101]:80", 1);
        let actions = reload(&old, &load(&format!("{BASE}{moved}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vip_changes(&actions), ["-web6", "+web6"]);
    }

    #[test]
    fn a_refusal_refuses_everything() {
        // A weight change alongside a restart-only change plans nothing.
        let new = BASE
            .replacen("address = \"198.18.2.12:8080\"", "address = \"198.18.2.12:8080\"\nweight = 0", 1)
            .replacen("veth-b", "veth-c", 1);
        assert_eq!(refused_key(&new), "agent.interfaces");
    }
}
