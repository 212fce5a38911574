//! The MSS a DSR backend announces is lowered by the tunnel's 20 bytes on its way to the
//! client, so that the client's segments still fit the uplink's MTU once the first node
//! has tunnelled them.

use aya_ebpf::programs::TcContext;

use crate::parse::Flow;

const TUNNEL_OVERHEAD: u16 = 20;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// Options take at most 40 bytes; each but NOP takes at least 2.
const MAX_OPTIONS: usize = 20;

/// Lowers the MSS option of a SYN-ACK, if it has one.
#[inline(always)]
pub fn clamp(ctx: &TcContext, flow: &Flow) -> Result<(), ()> {
    let doff: u8 = ctx.load(flow.l4_off + 12).map_err(|_| ())?;
    let end = flow.l4_off + ((doff >> 4) as usize) * 4;
    let mut off = flow.l4_off + 20;
    for _ in 0..MAX_OPTIONS {
        if off + 4 > end {
            return Ok(());
        }
        let kind: u8 = ctx.load(off).map_err(|_| ())?;
        match kind {
            TCPOPT_EOL => return Ok(()),
            TCPOPT_NOP => off += 1,
            TCPOPT_MSS => {
                let old: u16 = ctx.load(off + 2).map_err(|_| ())?;
                let mss = u16::from_be(old);
                if mss <= TUNNEL_OVERHEAD + 536 {
                    return Ok(());
                }
                let new = (mss - TUNNEL_OVERHEAD).to_be();
                let csum = crate::parse::l4_csum_off(flow);
                ctx.l4_csum_replace(csum, old as u64, new as u64, 2)
                    .map_err(|_| ())?;
                return ctx.store(off + 2, &new, 0).map_err(|_| ());
            }
            _ => {
                let len: u8 = ctx.load(off + 1).map_err(|_| ())?;
                if len < 2 {
                    return Ok(());
                }
                off += len as usize;
            }
        }
    }
    Ok(())
}
