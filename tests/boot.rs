//! Boots the real default guest (Debian cloud kernel + hvprobe initramfs) with the `hvprobe`
//! binary, through the emulated KVM runner where the host's KVM cannot do the job, and checks
//! what the guest printed and how hvprobe exited.

mod common;

use common::{
    Guests, Run, assert_has, explain, fnv1a, guest_arch, hvprobe, hvprobe_in,
    kernel_release_suffix, text,
};
use hvprobe_guest::GuestArch;
use hvprobe_vmm::summary::OutcomeKind;

fn boot(vcpus: &str, exec: &str, timeout: &str) -> Run {
    Run::new(&[
        "run",
        "--vcpus",
        vcpus,
        "--exec",
        exec,
        "--timeout",
        timeout,
        "--timings",
    ])
}

/// Started where a user may be, outside the source tree (whose `.cargo/config.toml` holds the
/// cross-build settings of the arm64 runner's hvprobe).
fn one_vcpu_boots_to_init_from_outside_the_source_tree_and_returns_the_commands_status() {
    let elsewhere = std::env::temp_dir().join(format!("hvprobe-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = hvprobe_in(
        Some(&elsewhere),
        &[
            "run",
            "--vcpus",
            "1",
            "--exec",
            "echo sum=$((6 * 7)); uname -r; grep -c ^processor /proc/cpuinfo; exit 7",
            "--timeout",
            "300",
            "--timings",
        ],
    );
    let _ = std::fs::remove_dir(&elsewhere);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{}", explain(&out));
    assert_has(&stdout, hvprobe_guest::INIT_READY_MARKER, &out);
    assert_has(&stdout, "sum=42\n", &out);
    assert_has(&stdout, &format!("{}\n", kernel_release_suffix()), &out);
    let lines: Vec<&str> = stdout.lines().collect();
    let sum_at = lines.iter().position(|l| *l == "sum=42").unwrap();
    assert_eq!(lines[sum_at + 2], "1", "one CPU online: {}", explain(&out));
    assert_has(&text(&out.stderr), "boot to /init", &out);
}

fn two_vcpus_boot_and_both_run() {
    // Two busy loops pinned to each CPU must both finish; the count of online CPUs is 2.
    let out = boot(
        "2",
        "grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online; \
         getpid-loop 20000 & getpid-loop 20000 & wait",
        "300",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"2"), "{}", explain(&out));
    assert!(lines.contains(&"0-1"), "{}", explain(&out));
    assert_eq!(
        stdout.matches("getpid-loop: calls=20000").count(),
        2,
        "{}",
        explain(&out)
    );
}

fn workloads_run_and_the_kernel_computes_right_results() {
    let out = boot(
        "1",
        "getpid-loop 5000 && open-read-loop 4 /etc/passwd && fork-exec-loop 6",
        "300",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(&stdout, "getpid-loop: calls=5000 pid=", &out);
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let want = format!(
        "open-read-loop: path=/etc/passwd opens=4 bytes={} fnv1a={:016x}",
        4 * passwd.len(),
        fnv1a(passwd)
    );
    assert_has(&stdout, &want, &out);
    assert_has(&stdout, "fork-exec-loop: runs=6 ok=6", &out);
}

fn a_guest_kernel_panic_is_reported() {
    let out = boot("1", "echo c > /proc/sysrq-trigger; sleep 60", "200");
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    let outcome = &out.summary().outcome;
    assert_eq!(outcome.kind, OutcomeKind::Panicked, "{}", explain(&out));
    // The panic line names the cause, and the user is told it.
    let line = outcome.detail.as_deref().unwrap_or_default();
    assert!(line.contains("sysrq triggered crash"), "{}", explain(&out));
    assert_has(
        &text(&out.stderr),
        &format!("guest kernel panicked: {line}"),
        &out,
    );
}

fn a_hung_guest_is_stopped_at_the_timeout() {
    let out = boot("1", "echo hanging; sleep 100000", "40");
    assert_eq!(out.status.code(), Some(124), "{}", explain(&out));
    assert_has(&text(&out.stdout), "hanging", &out);
    let outcome = &out.summary().outcome;
    assert_eq!(outcome.kind, OutcomeKind::TimedOut, "{}", explain(&out));
    assert_eq!(outcome.detail.as_deref(), Some("40 s"));
    assert_has(&text(&out.stderr), "did not finish within 40 s", &out);
    // Where the vCPU was: idle in the kernel, named by System.map.
    let stderr = text(&out.stderr);
    let at = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hvprobe: at the time limit, vCPU 0 was at 0x"))
        .unwrap_or_else(|| panic!("no whereabouts line\n{}", explain(&out)));
    assert!(
        at.contains(" in the kernel (") && at.contains("+0x"),
        "{at}"
    );
}

fn bad_inputs_get_one_clear_error_each() {
    let missing = hvprobe(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_has(
        &text(&missing.stderr),
        "--kernel /nonexistent/bzImage: no such file",
        &missing,
    );

    let dir = std::env::temp_dir().join(format!("hvprobe-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_bz = dir.join("not-a-kernel");
    std::fs::write(&not_bz, vec![0x7fu8; 4096]).unwrap();
    let out = hvprobe(&["run", "--kernel", not_bz.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let (format, magic) = match guest_arch() {
        GuestArch::X86_64 => ("is not a bzImage", "HdrS"),
        GuestArch::Aarch64 => ("is not an arm64 Image", "ARM\\x64"),
    };
    assert_has(&stderr, format, &out);
    assert_has(&stderr, magic, &out);
    assert_eq!(stderr.lines().count(), 1, "{}", explain(&out));
    if guest_arch() == GuestArch::Aarch64 {
        // A compressed EFI_ZBOOT image is named as such.
        let mut zboot = vec![0u8; 4096];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        let path = dir.join("vmlinuz.efi");
        std::fs::write(&path, zboot).unwrap();
        let out = hvprobe(&["run", "--kernel", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert_has(&text(&out.stderr), "compressed EFI_ZBOOT image", &out);
        assert_eq!(text(&out.stderr).lines().count(), 1, "{}", explain(&out));
    }

    let out = hvprobe(&["run", "--memory", "0", "--exec", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_has(&text(&out.stderr), "--memory 0 MiB is too small", &out);
    let out = hvprobe(&["run", "--vcpus", "0", "--exec", "true"]);
    assert_has(&text(&out.stderr), "--vcpus 0 is out of range", &out);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn check_host_answers_in_one_line() {
    let out = hvprobe(&["check-host"]);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{}", explain(&out));
    match out.status.code() {
        Some(0) => assert_has(&stdout, "host KVM is usable", &out),
        Some(2) => assert_has(&stdout, "host KVM cannot run hvprobe guests: ", &out),
        _ => panic!("{}", explain(&out)),
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_has(&stdout, "kvm_pvm", &out);
    }
}

fn the_arm64_trap_self_test_sees_every_trap_and_hands_a_brk_back() {
    if GuestArch::host() == GuestArch::Aarch64 {
        // On an arm64 host `check-host` above runs the same self-test on the host's KVM.
        return;
    }
    let out = hvprobe(&["check-host", "--arch", "aarch64"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_eq!(stdout.lines().count(), 1, "{}", explain(&out));
    assert_has(&stdout, "usable for aarch64 guests", &out);
    assert_has(&stdout, "brk exits yes, step yes, hw breakpoints ", &out);
    assert_has(&stdout, ", reinjection yes)", &out);
    let n: usize = stdout
        .split("hw breakpoints ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 2, "{}", explain(&out));
}

fn main() {
    common::run_suite(
        "boot",
        cases![
            Guests::Any => [
                one_vcpu_boots_to_init_from_outside_the_source_tree_and_returns_the_commands_status,
                two_vcpus_boot_and_both_run,
                workloads_run_and_the_kernel_computes_right_results,
                a_guest_kernel_panic_is_reported,
                a_hung_guest_is_stopped_at_the_timeout,
                bad_inputs_get_one_clear_error_each,
                check_host_answers_in_one_line,
            ],
            Guests::Only(GuestArch::Aarch64) => [
                the_arm64_trap_self_test_sees_every_trap_and_hands_a_brk_back,
            ],
        ],
    );
}
