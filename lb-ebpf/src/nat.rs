//! Address and port rewrites with checksum updates. XDP sees complete checksums and
//! updates them by arithmetic; TC may see CHECKSUM_PARTIAL packets from local sockets, so
//! it goes through the kernel's csum_replace helpers, which handle both cases.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::proto;

use crate::{
    csum,
    parse::{l4_csum_off, ptr_at, Flow},
};

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

impl End {
    fn addr_off(self) -> usize {
        match self {
            End::Src => 12,
            End::Dst => 16,
        }
    }
    fn port_off(self) -> usize {
        match self {
            End::Src => 0,
            End::Dst => 2,
        }
    }
}

fn has_ports(flow: &Flow) -> bool {
    !flow.later_fragment && (flow.proto == proto::TCP || flow.proto == proto::UDP)
}

pub trait Rewrite {
    /// Sets one end's address and, where the packet carries ports, its port.
    fn rewrite(&self, flow: &Flow, end: End, addr: u32, port: u16) -> Result<(), ()>;
    /// The packet's (data, data_end), after making at least its first `len` bytes (or all
    /// of it, if shorter) directly accessible.
    fn linear(&self, len: usize) -> (usize, usize);
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn linear(&self, _len: usize) -> (usize, usize) {
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn rewrite(&self, flow: &Flow, end: End, addr: u32, port: u16) -> Result<(), ()> {
        let (data, data_end) = (self.data(), self.data_end());
        let ip_addr: *mut u32 = ptr_at(data, data_end, flow.l3_off + end.addr_off()).ok_or(())?;
        let ip_csum: *mut u16 = ptr_at(data, data_end, flow.l3_off + 10).ok_or(())?;
        let old_addr = unsafe { ip_addr.read_unaligned() };
        if has_ports(flow) {
            let l4_port: *mut u16 =
                ptr_at(data, data_end, flow.l4_off + end.port_off()).ok_or(())?;
            let l4_csum: *mut u16 = ptr_at(data, data_end, l4_csum_off(flow)).ok_or(())?;
            unsafe {
                let old_port = l4_port.read_unaligned();
                let c = l4_csum.read_unaligned();
                // A UDP checksum of zero means "none" and must stay so.
                if flow.proto == proto::TCP || c != 0 {
                    let c = csum::update16(csum::update32(c, old_addr, addr), old_port, port);
                    l4_csum.write_unaligned(if flow.proto == proto::UDP && c == 0 {
                        0xffff
                    } else {
                        c
                    });
                }
                l4_port.write_unaligned(port);
            }
        }
        unsafe {
            ip_csum.write_unaligned(csum::update32(ip_csum.read_unaligned(), old_addr, addr));
            ip_addr.write_unaligned(addr);
        }
        Ok(())
    }
}

impl Rewrite for TcContext {
    #[inline(always)]
    fn linear(&self, len: usize) -> (usize, usize) {
        let total = self.len() as usize;
        if self.data_end() - self.data() < len.min(total) {
            // On failure the packet stays as it was and later bounds checks refuse it.
            let _ = self.pull_data(len.min(total) as u32);
        }
        (self.data(), self.data_end())
    }

    #[inline(always)]
    fn rewrite(&self, flow: &Flow, end: End, addr: u32, port: u16) -> Result<(), ()> {
        let old_addr: u32 = self.load(flow.l3_off + end.addr_off()).map_err(|_| ())?;
        if has_ports(flow) {
            let csum_off = l4_csum_off(flow);
            let mangled = if flow.proto == proto::UDP {
                BPF_F_MARK_MANGLED_0 as u64
            } else {
                0
            };
            let port_off = flow.l4_off + end.port_off();
            let old_port: u16 = self.load(port_off).map_err(|_| ())?;
            self.l4_csum_replace(
                csum_off,
                old_addr as u64,
                addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .map_err(|_| ())?;
            self.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2)
                .map_err(|_| ())?;
            self.store(port_off, &port, 0).map_err(|_| ())?;
        }
        self.l3_csum_replace(flow.l3_off + 10, old_addr as u64, addr as u64, 4)
            .map_err(|_| ())?;
        self.store(flow.l3_off + end.addr_off(), &addr, 0)
            .map_err(|_| ())?;
        Ok(())
    }
}
