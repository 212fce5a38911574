//! Booting a kernel under qemu (TCG) with the test image, streaming its serial console to a
//! log file, and reading the results the guest's init prints.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// Marker prefix of the lines the guest's init writes for the host.
pub const MARK: &str = "LB-VM";

/// The guest's /init: mounts, modules, then each suite, one result line per suite.
pub fn init_script(suites: &[(String, Vec<String>)]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
/bin/busybox --install -s /bb
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb HOME=/root TMPDIR=/tmp LB_BIN=/t/lb RUST_BACKTRACE=0
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
while read -r m; do
    insmod "$m" 2>&1 || echo "LB-VM insmod-failed $m"
done < /modules/order
ip link set lo up
echo "LB-VM kernel $(uname -r)"
"#,
    );
    for (name, filters) in suites {
        let filters: String = filters.iter().map(|f| format!(" '{f}'")).collect();
        s.push_str(&format!(
            "echo \"{MARK} begin {name}\"\n\
             /t/{name} --include-ignored --test-threads=1{filters} 2>&1\n\
             echo \"{MARK} end {name} rc=$?\"\n"
        ));
    }
    s.push_str(&format!("echo \"{MARK} done\"\npoweroff -f\n"));
    s
}

/// One suite's result as the guest reported it.
#[derive(Debug, Default, PartialEq)]
pub struct Suite {
    pub name: String,
    /// The test executable's exit code; None when the guest stopped before it ended.
    pub rc: Option<i32>,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// Everything the executable printed.
    pub output: String,
}

/// What the host learned from one boot.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub release: Option<String>,
    pub suites: Vec<Suite>,
    pub done: bool,
    pub insmod_failed: Vec<String>,
}

pub fn parse(console: &str) -> Report {
    let mut r = Report::default();
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(MARK).map(str::trim) {
            if let Some(v) = rest.strip_prefix("kernel ") {
                r.release = Some(v.to_string());
            } else if let Some(name) = rest.strip_prefix("begin ") {
                r.suites.push(Suite {
                    name: name.to_string(),
                    ..Suite::default()
                });
            } else if let Some(end) = rest.strip_prefix("end ") {
                if let (Some(s), Some((_, rc))) = (r.suites.last_mut(), end.split_once("rc=")) {
                    s.rc = rc.trim().parse().ok();
                }
            } else if let Some(m) = rest.strip_prefix("insmod-failed ") {
                r.insmod_failed.push(m.to_string());
            } else if rest == "done" {
                r.done = true;
            }
            continue;
        }
        let Some(s) = r.suites.last_mut().filter(|s| s.rc.is_none()) else {
            continue;
        };
        s.output.push_str(line);
        s.output.push('\n');
        // "test name ... ok" / "test name ... FAILED"
        if let Some(t) = line.strip_prefix("test ") {
            if let Some(name) = t.strip_suffix(" ... ok") {
                s.passed.push(name.to_string());
            } else if let Some(name) = t.strip_suffix(" ... FAILED") {
                s.failed.push(name.to_string());
            }
        }
    }
    r
}

/// The captured output of one failed test, from the harness's "failures:" section.
pub fn failure_output<'a>(suite: &'a Suite, test: &str) -> Option<&'a str> {
    let head = format!("---- {test} stdout ----\n");
    let start = suite.output.find(&head)? + head.len();
    let rest = &suite.output[start..];
    let end = ["\n---- ", "\nfailures:\n"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The end of a verifier log in `text` (aya: "... Verifier output: <log>"), if any.
pub fn verifier_excerpt(text: &str, lines: usize) -> Option<String> {
    // The error's Display says "Verifier output:", its Debug form "verifier_log:".
    let at = ["Verifier output:", "verifier_log:"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()?;
    let log: Vec<&str> = text[at..]
        .lines()
        .take_while(|l| {
            !l.starts_with("note: run with") && !l.starts_with("---- ") && l.trim() != "}"
        })
        .collect();
    let start = log.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(log[0]);
        out.push_str("\n  ...\n");
    }
    for l in &log[start..] {
        out.push_str(l);
        out.push('\n');
    }
    Some(out)
}

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Passed,
    Failed,
    VerifierRejected(String),
    /// The guest stopped (or was stopped) before reporting every suite.
    NoResult,
}

pub fn outcome(r: &Report) -> Outcome {
    if !r.done || r.suites.iter().any(|s| s.rc.is_none()) {
        return Outcome::NoResult;
    }
    if r.suites.iter().all(|s| s.rc == Some(0)) {
        return Outcome::Passed;
    }
    match r
        .suites
        .iter()
        .find_map(|s| verifier_excerpt(&s.output, 20))
    {
        Some(v) => Outcome::VerifierRejected(v),
        None => Outcome::Failed,
    }
}

/// The process group of the running `timeout` + qemu, for the signal handler.
static GUEST_GROUP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(sig: libc::c_int) {
    let group = GUEST_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill and _exit are async-signal-safe.
    unsafe {
        if group > 0 {
            libc::kill(-group, libc::SIGKILL);
        }
        libc::_exit(128 + sig);
    }
}

/// Kills `timeout` and qemu (their own process group) if the host side stops early, on
/// an error or on Ctrl-C / SIGTERM.
struct Guard(Option<Child>);

impl Guard {
    fn new(child: Child) -> Self {
        GUEST_GROUP.store(child.id() as i32, Ordering::SeqCst);
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
        Self(Some(child))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling the process group this module created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        GUEST_GROUP.store(0, Ordering::SeqCst);
    }
}

pub struct Boot<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub log: &'a Path,
    pub timeout: Duration,
    pub memory_mb: u32,
}

/// Boots the kernel, streams the console to the log (and progress lines to stdout) and
/// returns the console text and how long the guest ran.
pub fn boot(b: &Boot) -> Result<(String, Duration)> {
    let started = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", &format!("{}", b.timeout.as_secs())])
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &b.memory_mb.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 random.trust_cpu=on mitigations=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, so that it and qemu can be killed together.
        .process_group(0);
    let mut child = cmd.spawn().context("start qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let mut guard = Guard::new(child);
    let mut log = fs::File::create(b.log).with_context(|| format!("create {}", b.log.display()))?;
    let mut console = String::new();
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf);
        log.write_all(line.as_bytes())?;
        let trimmed = line.trim_end();
        if trimmed.starts_with(MARK)
            || trimmed.starts_with("test ")
            || trimmed.starts_with("Kernel panic")
        {
            println!("[{}] {trimmed}", b.label);
        }
        console.push_str(&line);
    }
    let status = guard.0.as_mut().map(|c| c.wait()).transpose()?;
    // Reaped: nothing is left to kill.
    guard.0 = None;
    drop(guard);
    if status
        .and_then(|s| s.code())
        .is_some_and(|c| c == 124 || c == 137)
    {
        println!("[{}] timed out after {}s", b.label, b.timeout.as_secs());
    }
    Ok((console, started.elapsed()))
}

/// Where a kernel's console log goes.
pub fn log_path(dir: &Path, release: &str) -> PathBuf {
    dir.join(format!("console-{release}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\
[    1.234] Run /init as init process\r
LB-VM insmod-failed /modules/05-ipip.ko\r
LB-VM kernel 6.1.0-57-cloud-amd64\r
LB-VM begin fixtures\r
\r
running 2 tests\r
test xdp_nodeport ... ok\r
test tc_reverse ... ok\r
\r
test result: ok. 2 passed; 0 failed; 0 ignored\r
LB-VM end fixtures rc=0\r
LB-VM begin netns\r
running 2 tests\r
test a_pod_reaches ... FAILED\r
test two_nodes ... ok\r
\r
failures:\r
\r
---- a_pod_reaches stdout ----\r
agent did not sync; log:\r
load the eBPF programs: the BPF_PROG_LOAD syscall failed. Verifier output: 0: (bf) r6 = r1\r
1: (61) r2 = *(u32 *)(r6 +4)\r
R2 invalid mem access 'scalar'\r
processed 2 insns\r
\r
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\r
\r
failures:\r
    a_pod_reaches\r
\r
test result: FAILED. 1 passed; 1 failed; 0 ignored\r
LB-VM end netns rc=101\r
LB-VM done\r
";

    #[test]
    fn the_console_gives_each_suite_and_test() {
        let r = parse(CONSOLE);
        assert_eq!(r.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert!(r.done);
        assert_eq!(r.insmod_failed, ["/modules/05-ipip.ko"]);
        assert_eq!(r.suites.len(), 2);
        assert_eq!(r.suites[0].rc, Some(0));
        assert_eq!(r.suites[0].passed, ["xdp_nodeport", "tc_reverse"]);
        assert_eq!(r.suites[1].rc, Some(101));
        assert_eq!(r.suites[1].failed, ["a_pod_reaches"]);
        assert_eq!(r.suites[1].passed, ["two_nodes"]);
        let out = failure_output(&r.suites[1], "a_pod_reaches").unwrap();
        assert!(out.starts_with("agent did not sync"));
        assert!(out.contains("processed 2 insns"));
        assert!(!out.contains("failures:"));
    }

    #[test]
    fn a_verifier_rejection_is_told_apart_with_its_log() {
        let r = parse(CONSOLE);
        let Outcome::VerifierRejected(excerpt) = outcome(&r) else {
            panic!("{:?}", outcome(&r));
        };
        assert!(excerpt.contains("R2 invalid mem access 'scalar'"));
        assert!(!excerpt.contains("note: run with"));
    }

    #[test]
    fn the_verifier_log_of_a_debug_printed_load_error_is_found() {
        let text =
            "load lb_xdp: LoadError { io_error: Os { code: 13 }, verifier_log: 0: R1=ctx()\n\
                    3165: (71) r3 = *(u8 *)(r2 +96)\n\
                    R2 unbounded memory access, make sure to bounds check any such access\n\
                    processed 27460 insns (limit 1000000)\n }\n\
                    note: run with `RUST_BACKTRACE=1`\n";
        let v = verifier_excerpt(text, 20).unwrap();
        assert!(v.starts_with("verifier_log: 0: R1=ctx()"));
        assert!(v.contains("R2 unbounded memory access"));
        assert!(v.trim_end().ends_with("(limit 1000000)"));
    }

    #[test]
    fn a_guest_that_stops_early_has_no_result() {
        let cut = &CONSOLE[..CONSOLE.find("LB-VM end netns").unwrap()];
        let r = parse(cut);
        assert_eq!(r.suites[1].rc, None);
        assert_eq!(outcome(&r), Outcome::NoResult);
        let passed = CONSOLE.replace("rc=101", "rc=0");
        assert_eq!(outcome(&parse(&passed)), Outcome::Passed);
        let failed = CONSOLE.replace("Verifier output:", "error:");
        assert_eq!(outcome(&parse(&failed)), Outcome::Failed);
    }

    #[test]
    fn the_init_script_runs_each_suite_with_its_filters() {
        let s = init_script(&[
            ("fixtures".into(), vec![]),
            ("netns".into(), vec!["two_nodes".into()]),
        ]);
        assert!(s.contains("/t/fixtures --include-ignored --test-threads=1 2>&1\n"));
        assert!(s.contains("/t/netns --include-ignored --test-threads=1 'two_nodes' 2>&1\n"));
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}
