//! `guest/apt-backports.sh` (called by `guest/setup-host.sh`) against fixture apt directories:
//! backports must count as configured per type (`deb`, `deb-src`) only when an entry of that
//! type lists the backports suite, existing files must stay untouched, and a second run must
//! add nothing. The script runs for real, pointed at a temporary directory instead of /etc/apt.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian 12's own `/etc/apt/sources.list.d/debian.sources`, as a fresh machine has it.
const STOCK_DEB822: &str = include_str!("fixtures/apt/debian12-stock.sources");

const BACKPORTS_DEB822: &str = "Types: deb\nURIs: http://deb.debian.org/debian\n\
Suites: bookworm-backports\nComponents: main\n\
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apt-backports.sh")
}

/// A fixture apt directory holding `files` (paths relative to it).
fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("sources.list.d")).unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Every file under the fixture with its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for sub in ["", "sources.list.d"] {
        for entry in fs::read_dir(dir.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(name, fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

fn run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .env("HVPROBE_APT_ETC", dir)
        .env("HVPROBE_CODENAME", "bookworm")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apt-backports.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the script on a fixture twice; returns the files it added (name -> contents) after the
/// first run, asserting that the files that were there are unchanged, that the second run
/// changes nothing, and that afterwards both types count as configured.
fn added_by_setup(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    let dir = fixture(files);
    let before = snapshot(dir.path());
    run(dir.path(), &[]);
    let after = snapshot(dir.path());
    for (name, text) in &before {
        assert_eq!(after.get(name), Some(text), "{name} was changed");
    }
    assert_eq!(run(dir.path(), &["--check"]), "deb yes\ndeb-src yes\n");
    run(dir.path(), &[]);
    assert_eq!(
        snapshot(dir.path()),
        after,
        "a second run changed the files"
    );
    after
        .into_iter()
        .filter(|(name, _)| !before.contains_key(name))
        .collect()
}

fn stanza_types(added: &BTreeMap<String, String>) -> Vec<String> {
    let mut types: Vec<String> = added
        .values()
        .flat_map(|text| text.lines())
        .filter_map(|l| l.strip_prefix("Types: ").map(str::to_string))
        .collect();
    types.sort();
    types
}

#[test]
fn stock_debian12_deb822_gets_both_entries_from_its_own_mirror() {
    let dir = fixture(&[("sources.list.d/debian.sources", STOCK_DEB822)]);
    assert_eq!(run(dir.path(), &["--check"]), "deb no\ndeb-src no\n");
    let added = added_by_setup(&[("sources.list.d/debian.sources", STOCK_DEB822)]);
    assert_eq!(stanza_types(&added), ["deb", "deb-src"]);
    for text in added.values() {
        assert!(
            text.contains("URIs: http://deb.debian.org/debian\n"),
            "{text}"
        );
        assert!(text.contains("Suites: bookworm-backports\n"), "{text}");
    }
}

#[test]
fn stock_plus_binary_backports_gets_only_deb_src() {
    let files = [
        ("sources.list.d/debian.sources", STOCK_DEB822),
        ("sources.list.d/backports.sources", BACKPORTS_DEB822),
    ];
    let dir = fixture(&files);
    assert_eq!(run(dir.path(), &["--check"]), "deb yes\ndeb-src no\n");
    assert_eq!(stanza_types(&added_by_setup(&files)), ["deb-src"]);
}

#[test]
fn one_line_sources_list_with_backports_gets_nothing() {
    let list = "deb http://ftp.example.org/debian bookworm main\n\
        deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.example.org/debian bookworm-backports main contrib\n\
        deb-src http://ftp.example.org/debian bookworm-backports main\n";
    assert!(added_by_setup(&[("sources.list", list)]).is_empty());
}

#[test]
fn deb_src_only_gets_deb_from_the_one_line_mirror() {
    let list = "# deb http://commented.example.org/debian bookworm-backports main\n\
        deb http://ftp.example.org/debian bookworm main\n\
        deb-src http://ftp.example.org/debian bookworm-backports main\n";
    let added = added_by_setup(&[("sources.list", list)]);
    assert_eq!(stanza_types(&added), ["deb"]);
    let text = added.values().next().unwrap();
    assert!(
        text.contains("URIs: http://ftp.example.org/debian\n"),
        "{text}"
    );
}

#[test]
fn disabled_stanzas_and_files_apt_ignores_do_not_count() {
    let disabled = BACKPORTS_DEB822.replace("Types: deb\n", "Types: deb deb-src\nEnabled: no\n");
    let files = [
        ("sources.list.d/debian.sources", STOCK_DEB822),
        ("sources.list.d/off.sources", disabled.as_str()),
        ("sources.list.d/bp.sources.disabled", BACKPORTS_DEB822),
    ];
    let dir = fixture(&files);
    assert_eq!(run(dir.path(), &["--check"]), "deb no\ndeb-src no\n");
    assert_eq!(stanza_types(&added_by_setup(&files)), ["deb", "deb-src"]);
}

#[test]
fn multi_type_stanza_with_continued_suites_counts_for_both() {
    let stanza = "Types: deb deb-src\nURIs: http://deb.debian.org/debian\n\
        Suites: bookworm\n bookworm-backports\nComponents: main\n";
    let files = [("sources.list.d/all.sources", stanza)];
    let dir = fixture(&files);
    assert_eq!(run(dir.path(), &["--check"]), "deb yes\ndeb-src yes\n");
    assert!(added_by_setup(&files).is_empty());
}

#[test]
fn no_debian_mirror_is_a_clear_error_and_writes_nothing() {
    let dir = fixture(&[]);
    let out = Command::new("bash")
        .arg(script())
        .env("HVPROBE_APT_ETC", dir.path())
        .env("HVPROBE_CODENAME", "bookworm")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot find this machine's Debian mirror"),
        "{stderr}"
    );
    assert!(snapshot(dir.path()).is_empty());
}
