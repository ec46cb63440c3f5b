//! A second client, one router hop further: for path MTU tests where the
//! narrow hop is beyond the gateway.
//!
//! ```text
//!  far ns                     client ns (now also a router)      gateway ns
//!  <id>f 198.18.3.2/24 ────── <id>fc 198.18.3.1/24               routes 198.18.3.0/24
//!        2001:db8:3::2/64           2001:db8:3::1/64             via the client ns
//!  default via the client ns  forwarding on; its route to the far client has a
//!                             locked MTU: a narrower hop, like a tunnel
//! ```
//!
//! Both ends of the far link keep MTU 1500, so the far client's SYN offers
//! MSS 1460 and the backend sends full-size segments; the client namespace
//! cannot forward them over its narrow route and sends "fragmentation
//! needed" (ICMPv6 packet too big) to their source: the VIP. Only the load
//! balancer can take that error to the backend.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;

use super::{
    CLIENT_ADDR, CLIENT_ADDR6, NETNS_ADD, Namespace, Testbed, add_addresses, add_default_routes, enable_ipv6, lock,
    netns::ip,
};

/// The far client's addresses.
pub const FAR_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
pub const FAR_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);
/// The client namespace's addresses on the far link.
const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const ROUTER_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);

impl Testbed {
    /// Adds the far client, reached from the client namespace over a route
    /// whose MTU is `narrow_mtu` (at least 1280). Deleted with the testbed.
    ///
    /// # Errors
    ///
    /// When a step fails; what was made is still deleted with the testbed.
    pub fn add_far_client(&mut self, narrow_mtu: u32) -> anyhow::Result<Namespace> {
        anyhow::ensure!(self.far_client.is_none(), "testbed {} has a far client already", self.id);
        let far = Namespace::new(format!("lbt{}-far", self.id));
        {
            let _serial = lock(&NETNS_ADD);
            ip(&["netns", "add", far.name()])?;
        }
        self.created.push(far.clone());
        if let Some(reaper) = &mut self.reaper {
            reaper.watch(&far)?;
        }
        self.far_client = Some(far.clone());
        self.link_far_client(&far, narrow_mtu)
            .with_context(|| format!("setting up the far client of testbed {}", self.id))?;
        Ok(far)
    }

    /// The far client's namespace, once added.
    #[must_use]
    pub fn far_client(&self) -> Option<&Namespace> {
        self.far_client.as_ref()
    }

    fn link_far_client(&self, far: &Namespace, narrow_mtu: u32) -> anyhow::Result<()> {
        let (client, gateway) = (self.client.name(), self.gateway.name());
        let (router_if, far_if) = (format!("t{}fc", self.id), format!("t{}f", self.id));
        enable_ipv6(far)?;
        ip(&["-n", far.name(), "link", "set", "lo", "up"])?;
        ip(&["-n", client, "link", "add", &router_if, "type", "veth", "peer", "name", &far_if, "netns", far.name()])?;
        for (ns, dev) in [(&self.client, &router_if), (far, &far_if)] {
            ns.set_sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
            ns.set_sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
            // Full checksums from the far client (see the module docs of the testbed).
            ns.exec_ok(&["ethtool", "-K", dev, "tx", "off"])?;
        }
        add_addresses(client, &router_if, ROUTER_ADDR, ROUTER_ADDR6)?;
        add_addresses(far.name(), &far_if, FAR_CLIENT_ADDR, FAR_CLIENT_ADDR6)?;
        ip(&["-n", client, "link", "set", &router_if, "up"])?;
        ip(&["-n", far.name(), "link", "set", &far_if, "up"])?;
        add_default_routes(far.name(), ROUTER_ADDR, ROUTER_ADDR6)?;

        self.client.set_sysctl("net.ipv4.ip_forward", "1")?;
        self.client.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for dev in ["all", "default", self.client_if.as_str(), router_if.as_str()] {
            self.client.set_sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }
        // The narrow hop: host routes with a locked MTU (unlocked, the
        // kernel would let forwarded packets use the device's MTU).
        let mtu = narrow_mtu.to_string();
        ip(&["-n", client, "route", "add", &format!("{FAR_CLIENT_ADDR}/32"), "dev", &router_if, "mtu", "lock", &mtu])?;
        ip(&[
            "-n",
            client,
            "-6",
            "route",
            "add",
            &format!("{FAR_CLIENT_ADDR6}/128"),
            "dev",
            &router_if,
            "mtu",
            "lock",
            &mtu,
        ])?;
        // The gateway reaches the far network through the client namespace.
        ip(&["-n", gateway, "route", "add", "198.18.3.0/24", "via", &CLIENT_ADDR.to_string()])?;
        ip(&["-n", gateway, "-6", "route", "add", "2001:db8:3::/64", "via", &CLIENT_ADDR6.to_string()])?;
        Ok(())
    }
}
