//! Config reload (SIGHUP): what differs between the running config and a
//! freshly loaded one, as a list of [`Action`]s the balancer can apply in
//! place, or the first difference it cannot apply yet, as a [`Refusal`].
//!
//! A reload is all or nothing: one refused key refuses the whole file, and
//! the agent keeps running on the config it has.
//!
//! Applied in place (VIPs are matched by `name`, backends by `address`):
//! - a backend's `weight` (0 drains, above 0 undrains) and `backup` flag;
//! - backends added to or removed from an existing VIP. An added backend gets
//!   a fresh id, never one used before; a removed backend's id is retired: its
//!   `BACKENDS` entry is written `DOWN` once the ring no longer names it, so
//!   flows pinned to it move at their next packet (TCP ones get a reset from
//!   their new backend), and the id is never handed out again while the agent
//!   runs;
//! - a VIP's `[vip.health_check]` (its checkers restart with the new
//!   parameters; their first probe decides at once).
//!
//! Refused, because they need a restart: every `[agent]` key, adding or
//! removing a VIP, and a VIP's `listen`, `protocol` or `scheduler`.

use std::{fmt, net::SocketAddr, path::PathBuf};

use crate::config::model::{AgentConfig, BackendConfig, Config, HealthCheckConfig, VipConfig};

/// One change a reload applies in place.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    SetWeight { vip: String, address: SocketAddr, from: u32, to: u32 },
    SetBackup { vip: String, address: SocketAddr, from: bool, to: bool },
    AddBackend { vip: String, backend: BackendConfig },
    RemoveBackend { vip: String, address: SocketAddr },
    SetHealthCheck { vip: String, check: HealthCheckConfig },
}

impl Action {
    /// The name of the VIP it changes.
    pub fn vip(&self) -> &str {
        match self {
            Action::SetWeight { vip, .. }
            | Action::SetBackup { vip, .. }
            | Action::AddBackend { vip, .. }
            | Action::RemoveBackend { vip, .. }
            | Action::SetHealthCheck { vip, .. } => vip,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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

/// The actions that turn `running` into `new`, in file order, or the first
/// difference that needs a restart.
///
/// # Errors
///
/// A [`Refusal`] naming the key (as `new`'s file spells it, or the running
/// one's for a removed VIP).
pub fn plan(running: &Config, new: &Config) -> Result<Vec<Action>, Refusal> {
    let refuse = |key: String, reason: &str| Refusal { file: new.source.clone(), key, reason: reason.to_owned() };
    if let Some(key) = changed_agent_key(&running.agent, &new.agent) {
        return Err(refuse(format!("agent.{key}"), "changed; changing it needs a restart"));
    }
    for (i, old) in running.vips.iter().enumerate() {
        if !new.vips.iter().any(|v| v.name == old.name) {
            return Err(refuse(
                format!("vip[{}] ({})", i + 1, old.name),
                "removed; removing a VIP needs a restart",
            ));
        }
    }
    let mut actions = Vec::new();
    for (i, vip) in new.vips.iter().enumerate() {
        let path = format!("vip[{}] ({})", i + 1, vip.name);
        let Some(old) = running.vips.iter().find(|v| v.name == vip.name) else {
            return Err(refuse(path, "added; adding a VIP needs a restart"));
        };
        if vip.listen != old.listen {
            return Err(refuse(format!("{path}.listen"), "changed; changing it needs a restart"));
        }
        if vip.protocol != old.protocol {
            return Err(refuse(format!("{path}.protocol"), "changed; changing it needs a restart"));
        }
        if vip.scheduler != old.scheduler {
            return Err(refuse(format!("{path}.scheduler"), "changed; changing it needs a restart"));
        }
        vip_actions(old, vip, &mut actions);
    }
    Ok(actions)
}

fn vip_actions(old: &VipConfig, new: &VipConfig, actions: &mut Vec<Action>) {
    let vip = || new.name.clone();
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
            actions.push(Action::SetWeight { vip: vip(), address: backend.address, from: was.weight, to: backend.weight });
        }
        if was.backup != backend.backup {
            actions.push(Action::SetBackup { vip: vip(), address: backend.address, from: was.backup, to: backend.backup });
        }
    }
    if old.health_check != new.health_check {
        actions.push(Action::SetHealthCheck { vip: vip(), check: new.health_check.clone() });
    }
}

/// The first `[agent]` key that differs.
fn changed_agent_key(old: &AgentConfig, new: &AgentConfig) -> Option<&'static str> {
    let AgentConfig { interfaces, admin_listen, xdp_mode, conntrack_capacity, ring_size, max_vips, max_vips_set: _ } = old;
    [
        ("interfaces", *interfaces != new.interfaces),
        ("admin_listen", *admin_listen != new.admin_listen),
        ("xdp_mode", *xdp_mode != new.xdp_mode),
        ("conntrack_capacity", *conntrack_capacity != new.conntrack_capacity),
        ("ring_size", *ring_size != new.ring_size),
        ("max_vips", *max_vips != new.max_vips),
    ]
    .into_iter()
    .find_map(|(key, changed)| changed.then_some(key))
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
        plan(&load(BASE), &load(new))
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
                    backend: BackendConfig { address: addr("198.18.2.13:8080"), weight: 1, backup: false }
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

    #[test]
    fn vip_identity_changes_need_a_restart() {
        assert_eq!(refused_key(&BASE.replacen("198.18.0.100:80\"", "198.18.0.101:80\"", 1)), "vip[1] (web).listen");
        assert_eq!(
            refused_key(&BASE.replacen("listen = \"198.18.0.100:80\"", "listen = \"198.18.0.100:80\"\nscheduler = \"source-hash\"", 1)),
            "vip[1] (web).scheduler"
        );
        assert_eq!(
            refused_key(&BASE.replacen("protocol = \"udp\"", "protocol = \"tcp\"", 1)),
            "vip[2] (dns).protocol"
        );
        // Renaming is removing one VIP and adding another.
        assert_eq!(refused_key(&BASE.replacen("\"dns\"", "\"dns2\"", 1)), "vip[2] (dns)");
        let added = format!("{BASE}\n[[vip]]\nname = \"more\"\nlisten = \"198.18.0.100:81\"\n[[vip.backend]]\naddress = \"198.18.2.11:8080\"\n");
        assert_eq!(refused_key(&added), "vip[3] (more)");
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
        let actions = plan(&old, &load(&format!("{BASE}{respelled}"))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            actions,
            vec![Action::SetWeight { vip: "web6".into(), address: addr("[2001:db8:2::12]:8080"), from: 1, to: 0 }]
        );
        assert_eq!(actions[0].to_string(), "vip web6 backend [2001:db8:2::12]:8080 weight 1 -> 0");
        let moved = web6.replacen("[2001:db8::100]:80", "[2001:db8::101]:80", 1);
        let refusal = plan(&old, &load(&format!("{BASE}{moved}"))).err().map(|r| r.key);
        assert_eq!(refusal.as_deref(), Some("vip[3] (web6).listen"));
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
