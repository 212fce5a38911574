//! The eBPF object embedded at build time (see build.rs).

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));

/// The embedded object, or an error when this binary was built without it.
pub fn ebpf_object() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        anyhow::bail!(
            "this lb binary was built without its eBPF programs; build it with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}
