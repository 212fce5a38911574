//! Embeds the eBPF object named by `LB_EBPF_OBJECT` (set by `cargo xtask build`), or an
//! empty stub so that `cargo build`, `clippy` and unit tests work without the eBPF
//! toolchain. An agent built with the stub refuses to start and says how to build it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("lb.bpf.o");
    match env::var_os("LB_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            fs::copy(&path, &out)
                .unwrap_or_else(|e| panic!("LB_EBPF_OBJECT={}: {e}", path.display()));
        }
        None => fs::write(&out, b"").expect("write eBPF stub"),
    }
}
