//! The network interfaces of the agent's network namespace, read through getifaddrs (which
//! asks the kernel over netlink) and watched through a netlink link subscription, never
//! through /sys/class/net: that shows the namespace of the mount, not of the process.

use std::{collections::BTreeMap, ffi::CStr, net::Ipv4Addr};

use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

/// Wakes whenever an interface appears, changes or goes away in this network namespace.
pub struct LinkEvents(TokioSocket);

impl LinkEvents {
    /// Subscribes before the caller's first `list()`, so no interface can slip in between.
    pub fn subscribe() -> std::io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32))?;
        Ok(Self(socket))
    }

    /// Waits for the next link message. The messages are not parsed: the caller lists the
    /// interfaces again, which also covers an overrun of the socket buffer (ENOBUFS), where
    /// messages were lost.
    pub async fn changed(&mut self) -> std::io::Result<()> {
        match self.0.recv_from_full().await {
            Err(e) if e.raw_os_error() != Some(libc::ENOBUFS) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Interface names with their IPv4 addresses.
pub fn list() -> std::io::Result<BTreeMap<String, Vec<Ipv4Addr>>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let addrs = out.entry(name).or_default();
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The index of an interface in this network namespace.
pub fn index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: name is a valid C string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The interface of the IPv4 default route, from this namespace's routing table.
pub fn default_route_iface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/net/route").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

/// The kernel driver of an interface (ETHTOOL_GDRVINFO), e.g. "veth".
pub fn driver(iface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 164],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 164],
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    let bytes = iface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed below; req points at live memory.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Shell-style glob with `*` and `?`, enough for interface name patterns.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("lbp?-*", "lbp1-a"));
        assert!(!glob_match("lbp?", "lbp12"));
    }
}
