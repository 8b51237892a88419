//! The `vip` claim: a floating address added to a local interface over rtnetlink, then
//! announced so the LAN's neighbour caches move to this host: gratuitous ARP in both the
//! request and the reply form for IPv4 (some routers honour only one), an unsolicited
//! neighbour advertisement with the override flag for IPv6. Release deletes the address.
//! The packet builders are pure and unit-tested; the sockets are the kernel's.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::LinkAttribute;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const EEXIST: i32 = libc::EEXIST;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// An interface's index and hardware address.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

/// An rtnetlink connection and the interface it will work on.
async fn open(interface: &str) -> Result<(rtnetlink::Handle, Link), String> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("cannot open rtnetlink: {e}"))?;
    tokio::spawn(conn);
    let l = link(&handle, interface).await?;
    Ok((handle, l))
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn link(h: &rtnetlink::Handle, name: &str) -> Result<Link, String> {
    let msg = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("interface `{name}`: {e}"))?
        .ok_or_else(|| format!("no interface `{name}`"))?;
    let mut mac = [0u8; 6];
    for a in &msg.attributes {
        if let LinkAttribute::Address(b) = a {
            if b.len() == 6 {
                mac.copy_from_slice(b);
            }
        }
    }
    Ok(Link {
        index: msg.header.index,
        mac,
    })
}

/// Our address on the interface, if it is there (with its message, for deletion).
async fn find(
    h: &rtnetlink::Handle,
    index: u32,
    ip: IpAddr,
) -> Result<Option<AddressMessage>, String> {
    let mut s = h
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(ip)
        .execute();
    s.try_next()
        .await
        .map_err(|e| format!("cannot list addresses: {e}"))
}

fn flags(m: &AddressMessage) -> AddressFlags {
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_truncate(m.header.flags.bits() as u32))
}

/// Add the address (already there is fine), then announce it once (`count` packets of each
/// form; a failed announcement is logged, not fatal). The caller schedules the second burst.
pub async fn add(interface: &str, ip: IpAddr, prefix: u8, count: u32) -> Result<(), String> {
    let (h, l) = open(interface).await?;
    let mut req = h.address().add(l.index, ip, prefix);
    if ip.is_ipv6() {
        // no duplicate address detection: the old holder may still have it for a moment, and
        // a tentative address cannot send the advertisement that moves the neighbours
        let m = req.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => {}
        Err(e) if netlink_errno(&e) == Some(EEXIST) => {}
        Err(e) => return Err(format!("cannot add {ip}/{prefix} to {interface}: {e}")),
    }
    // the address is ours now; a failed announcement leaves neighbours to find it when their
    // entries expire, which is slower but not a reason to give the address up again
    if let Err(e) = announce(&l, ip, count) {
        tracing::warn!(%ip, interface, error = %e, "failover: the address is added but could not be announced");
    }
    Ok(())
}

/// Delete the address; absent already is fine.
pub async fn del(interface: &str, ip: IpAddr) -> Result<(), String> {
    let (h, l) = open(interface).await?;
    let Some(m) = find(&h, l.index, ip).await? else {
        return Ok(());
    };
    match h.address().del(m).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(EADDRNOTAVAIL) => Ok(()),
        Err(e) => Err(format!("cannot remove {ip} from {interface}: {e}")),
    }
}

/// Whether the address is on the interface and usable (not failed duplicate detection).
pub async fn holds(interface: &str, ip: IpAddr) -> Result<bool, String> {
    let (h, l) = open(interface).await?;
    Ok(find(&h, l.index, ip)
        .await?
        .is_some_and(|m| !flags(&m).contains(AddressFlags::Dadfailed)))
}

/// Send `count` announcements of each form for `ip` on the interface.
pub async fn announce_by_name(interface: &str, ip: IpAddr, count: u32) -> Result<(), String> {
    let (_, l) = open(interface).await?;
    announce(&l, ip, count)
}

fn announce(l: &Link, ip: IpAddr, count: u32) -> Result<(), String> {
    match ip {
        IpAddr::V4(v4) => {
            for _ in 0..count {
                send_arp(l, &garp(l.mac, v4, ArpOp::Request))?;
                send_arp(l, &garp(l.mac, v4, ArpOp::Reply))?;
            }
        }
        IpAddr::V6(v6) => {
            for _ in 0..count {
                send_na(l, v6)?;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ArpOp {
    Request = 1,
    Reply = 2,
}

/// A gratuitous ARP packet (without the Ethernet header, which the kernel adds): sender and
/// target protocol address are both the VIP. The request form leaves the target hardware
/// address zero; the reply form sets it to broadcast (as `arping -U` / `-A` do).
pub fn garp(mac: [u8; 6], ip: Ipv4Addr, op: ArpOp) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&(op as u16).to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    if op == ArpOp::Reply {
        p[18..24].copy_from_slice(&[0xff; 6]);
    }
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// An unsolicited neighbour advertisement for `ip` (RFC 4861 §7.2.6): override set,
/// solicited clear, with our link-layer address. The checksum is left zero: the kernel
/// fills it in on ICMPv6 raw sockets.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // neighbour advertisement
    p[4] = 0x20; // O (override)
    p[8..24].copy_from_slice(&ip.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn send_arp(l: &Link, packet: &[u8; 28]) -> Result<(), String> {
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain socket calls on a descriptor we own, with a sockaddr_ll sized as passed.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, ETH_P_ARP.to_be() as i32);
        if fd < 0 {
            return Err(os_err("cannot open a packet socket for gratuitous ARP"));
        }
        let fd = Fd(fd);
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = l.index as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let n = libc::sendto(
            fd.0,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if n < 0 {
            return Err(os_err("cannot send gratuitous ARP"));
        }
    }
    Ok(())
}

fn send_na(l: &Link, ip: Ipv6Addr) -> Result<(), String> {
    let packet = unsolicited_na(l.mac, ip);
    // SAFETY: plain socket calls on a descriptor we own, with sockaddr_in6 sized as passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
        if fd < 0 {
            return Err(os_err(
                "cannot open an ICMPv6 socket for neighbour advertisement",
            ));
        }
        let fd = Fd(fd);
        let hops: libc::c_int = 255; // RFC 4861: receivers drop NDP with any other hop limit
        let ifindex = l.index as libc::c_int;
        for (opt, v) in [
            (libc::IPV6_MULTICAST_HOPS, hops),
            (libc::IPV6_UNICAST_HOPS, hops),
            (libc::IPV6_MULTICAST_IF, ifindex),
        ] {
            if libc::setsockopt(
                fd.0,
                libc::IPPROTO_IPV6,
                opt,
                (&v as *const libc::c_int).cast(),
                4,
            ) < 0
            {
                return Err(os_err("cannot set up the ICMPv6 socket"));
            }
        }
        let mut src: libc::sockaddr_in6 = std::mem::zeroed();
        src.sin6_family = libc::AF_INET6 as u16;
        src.sin6_addr.s6_addr = ip.octets();
        if ip.is_unicast_link_local() {
            src.sin6_scope_id = l.index;
        }
        if libc::bind(
            fd.0,
            (&src as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) < 0
        {
            return Err(os_err(&format!("cannot send from {ip}")));
        }
        let mut dst: libc::sockaddr_in6 = std::mem::zeroed();
        dst.sin6_family = libc::AF_INET6 as u16;
        dst.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
        dst.sin6_scope_id = l.index;
        let n = libc::sendto(
            fd.0,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&dst as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        );
        if n < 0 {
            return Err(os_err("cannot send the neighbour advertisement"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn gratuitous_arp_request_and_reply_forms() {
        let ip = Ipv4Addr::new(198, 18, 0, 100);
        let req = garp(MAC, ip, ArpOp::Request);
        assert_eq!(
            req,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // Ethernet/IPv4, request
                2, 0, 0x5e, 0x10, 0x20, 0x30, 198, 18, 0, 100, // sender: us, the VIP
                0, 0, 0, 0, 0, 0, 198, 18, 0, 100, // target: unknown MAC, the VIP
            ]
        );
        let rep = garp(MAC, ip, ArpOp::Reply);
        assert_eq!(&rep[6..8], &[0, 2]);
        assert_eq!(&rep[18..24], &[0xff; 6]);
        assert_eq!(&rep[24..28], &ip.octets());
        assert_eq!(&rep[8..18], &req[8..18]);
    }

    #[test]
    fn unsolicited_neighbour_advertisement_overrides_and_carries_the_mac() {
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let p = unsolicited_na(MAC, ip);
        assert_eq!(p[0], 136);
        assert_eq!(p[1], 0);
        assert_eq!(&p[2..4], &[0, 0], "checksum is the kernel's");
        assert_eq!(p[4], 0x20, "override set, router and solicited clear");
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &MAC);
    }
}
