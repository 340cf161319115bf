//! Command-line options of the passthrough virtio-net pieces: `ferry device virtio-net`.
use std::path::PathBuf;

use clap::Args;

/// `ferry device virtio-net`.
#[derive(Args, Debug, Clone)]
pub struct DeviceVirtioNetArgs {
    /// vfio-user socket to listen on (must not exist).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The host tap interface that is the NIC's wire (opened, or created, in this process's
    /// network namespace).
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// MAC address the device reports to the guest.
    #[arg(long, default_value = "52:54:00:fe:00:01", value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// Exit after the first client disconnects (instead of waiting for the next one).
    #[arg(long)]
    pub once: bool,
    /// Do not announce the MAC address (a broadcast RARP on the tap) each time the driver
    /// starts the device. The announcement is what moves a migrated VM's traffic: bridges and
    /// switches learn the address's new port as soon as the destination's device starts.
    #[arg(long)]
    pub no_announce: bool,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts
            .next()
            .ok_or_else(|| format!("{s:?}: six bytes needed"))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: {p:?} is not a hex byte"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?}: more than six bytes"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_mac("52:54:00:fe:00:01"),
            Ok([0x52, 0x54, 0, 0xfe, 0, 1])
        );
        assert!(parse_mac("52:54:00:fe:00").is_err());
        assert!(parse_mac("52:54:00:fe:00:01:02").is_err());
        assert!(parse_mac("52:54:00:fe:00:zz").is_err());
    }
}

/// The socket of `--passthrough virtio-net=SOCKET`, None for another device class.
pub fn net_socket(passthrough: &str) -> anyhow::Result<Option<PathBuf>> {
    match passthrough.strip_prefix("virtio-net=") {
        Some("") => anyhow::bail!("--passthrough {passthrough:?}: empty socket path"),
        Some(s) => Ok(Some(s.into())),
        None => Ok(None),
    }
}

/// Options of the network workloads.
#[derive(Args, Debug, Clone)]
pub struct NetCliArgs {
    /// `net-echo`, `net-stream`, `net-hostile`: the guest's IPv4 address.
    #[arg(long, default_value = "10.0.77.2")]
    pub net_ip: std::net::Ipv4Addr,
    /// `net-echo`: the UDP port echoed; `net-stream`: the port the peer's stream goes to.
    #[arg(long, default_value_t = 7777)]
    pub net_port: u16,
    /// `net-echo`: exit 0 after echoing this many datagrams; `net-stream`: datagrams of each
    /// stream (0: until stopped or --duration).
    #[arg(long, default_value_t = 0)]
    pub net_count: u64,
    /// `net-hostile`: the peer on the wire (e.g. the host end of the tap) the guest resolves
    /// and pings to make frames arrive and to check the NIC still works.
    #[arg(long, default_value = "10.0.77.1")]
    pub net_peer: std::net::Ipv4Addr,
}

impl NetCliArgs {
    /// The guest's view of these options.
    pub fn workload_args(&self) -> guest_abi::params::NetArgs {
        guest_abi::params::NetArgs {
            ip: u32::from(self.net_ip),
            udp_port: u32::from(self.net_port),
            count: self.net_count,
            peer_ip: u32::from(self.net_peer),
            reserved: 0,
        }
    }
}

/// The socket of `--passthrough virtio-net=SOCKET` among the passthrough options.
pub fn passthrough_socket(nvme: &crate::nvme_args::NvmeCliArgs) -> anyhow::Result<Option<PathBuf>> {
    match &nvme.passthrough {
        Some(p) => net_socket(p),
        None => Ok(None),
    }
}
