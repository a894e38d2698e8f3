//! Write-protected kernel memory (`--protect`): a write to protected bytes reported with its
//! writer, task and bytes, then completed (`allow`) or dropped (`deny`) exactly; writes to the
//! rest of a protected page completed silently; bad regions refused before boot.

use super::*;

/// The protected-write lines of `event` in a run's output.
fn protect_lines<'a>(stdout: &'a str, region: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|l| l.contains(" hv/protect: ") && l.contains(&format!(" addr={region}")))
        .collect()
}

/// A line's `bytes="..."` field, unescaped as the line escapes it (`\x00`).
fn written_bytes(line: &str) -> Vec<u8> {
    let s = line
        .split(" bytes=\"")
        .nth(1)
        .and_then(|r| r.rsplit_once('"'))
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("no bytes= in {line}"));
    let mut out = Vec::new();
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'x') => {
                let h: Vec<u8> = it.by_ref().take(2).collect();
                out.push(u8::from_str_radix(std::str::from_utf8(&h).unwrap(), 16).unwrap());
            }
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(c) => out.push(c),
            None => break,
        }
    }
    out
}

pub(super) fn a_denied_write_to_modprobe_path_is_reported_and_dropped_and_an_allowed_one_made() {
    let out = run_probed(
        "1",
        "echo /tmp/x > /proc/sys/kernel/modprobe; echo '|/tmp/y %p' > /proc/sys/kernel/core_pattern; cat /proc/sys/kernel/modprobe /proc/sys/kernel/core_pattern",
        &[],
        &[
            "--protect",
            "modprobe_path:deny",
            "--protect",
            "core_pattern",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    // The guest reads the old modprobe_path back, and the new core_pattern.
    let cat: Vec<&str> = stdout.lines().map(str::trim_end).collect();
    assert!(cat.contains(&"/sbin/modprobe"), "{}", explain(&out));
    assert!(!cat.contains(&"/tmp/x"), "{}", explain(&out));
    assert!(cat.contains(&"|/tmp/y %p"), "{}", explain(&out));
    // The sysctl handler stores byte by byte: one denied write per byte and the NUL, each
    // by sh through proc_dostring, and what it tried to write reads "/tmp/x\0".
    let denied = protect_lines(&stdout, "modprobe_path");
    assert_eq!(denied.len(), "/tmp/x".len() + 1, "{}", explain(&out));
    let mut tried = Vec::new();
    for l in &denied {
        assert!(l.starts_with("sh-"), "{l}");
        assert!(l.contains(": (proc_dostring+0x"), "writer named: {l}");
        assert!(l.ends_with(" denied"), "{l}");
        tried.extend(written_bytes(l));
    }
    assert_eq!(tried, b"/tmp/x\0", "{}", explain(&out));
    let allowed = protect_lines(&stdout, "core_pattern");
    assert_eq!(allowed.len(), "|/tmp/y %p".len() + 1, "{}", explain(&out));
    assert!(
        allowed.iter().all(|l| l.ends_with(" allowed")),
        "{}",
        explain(&out)
    );
    let p = out.probe("modprobe_path:deny");
    assert_eq!((p.plan.name(), p.hits), ("protect", denied.len() as u64));
    assert_eq!(out.probe("core_pattern").hits, allowed.len() as u64);
    let exits = &out.summary().exits;
    assert_eq!(
        exits.protected_writes,
        (denied.len() + allowed.len()) as u64,
        "{}",
        explain(&out)
    );
    assert!(
        !stdout.contains("WARNING:") && !stdout.contains("BUG:") && !stdout.contains("Oops"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);
}
