//! The build's source fingerprint: a hash of every source file the `hvprobe` binary is built
//! from (the three crates, the lock file), as `HVPROBE_SOURCE_HASH`. The arm64 runner checks
//! that the static aarch64 hvprobe it puts into L1 carries the same one: a cross build left
//! from other sources is refused by name instead of run.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("the workspace").to_path_buf();
    let inputs = [
        "vmm/src",
        "vmm/Cargo.toml",
        "probe-core/src",
        "probe-core/Cargo.toml",
        "guest",
        "Cargo.lock",
        "Cargo.toml",
    ];
    let mut all = Vec::new();
    for input in inputs {
        let path = root.join(input);
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_dir() {
            files(&path, &mut all);
        } else {
            all.push(path);
        }
    }
    all.sort();
    // FNV-1a, 64 bits, over each file's path (relative) and contents.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x100_0000_01b3);
        }
    };
    for path in &all {
        let relative = path.strip_prefix(&root).unwrap_or(path);
        eat(relative.to_string_lossy().as_bytes());
        eat(&[0]);
        eat(&std::fs::read(path).unwrap_or_default());
        eat(&[0]);
    }
    println!("cargo:rustc-env=HVPROBE_SOURCE_HASH={hash:016x}");
}
