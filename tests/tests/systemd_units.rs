//! The systemd units under `systemd/` pass `systemd-analyze verify`, and the key server's
//! unit keeps the hardening a reviewer expects (`systemd-analyze security` exposure).
//!
//! The units name installed paths (`/usr/local/bin`, `~/.local/bin`); `verify` checks that
//! the executables exist, so the test points them at the freshly built binaries in a copy.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// target/debug, where `cargo build --workspace --bins` put the binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn units_in_copy() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bins = bin_dir();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(root().join("systemd")).expect("systemd/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket")) || name.starts_with("org.") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("unit");
        let text = text
            .replace("%h/.local/bin/", &format!("{}/", bins.display()))
            .replace("/usr/local/bin/", &format!("{}/", bins.display()));
        let copy = dir.path().join(&name);
        std::fs::write(&copy, text).expect("write copy");
        units.push(copy);
    }
    units.sort();
    (dir, units)
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let (_dir, units) = units_in_copy();
    let names: Vec<_> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "nes-keyserver.service",
        "nes-notify.service",
        "nesd.service",
        "nesd.socket",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from systemd/"
        );
    }
    for bin in ["nesd", "nes-notify", "nes-keyserver"] {
        assert!(
            bin_dir().join(bin).exists(),
            "{bin} not built: run `cargo build --workspace --bins` first"
        );
    }
    for unit in &units {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit)
            .output()
            .expect("systemd-analyze (apt-get install systemd)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            unit.display()
        );
    }
}

#[test]
fn the_dbus_service_file_activates_nesd_through_systemd() {
    let text = std::fs::read_to_string(root().join("systemd/org.nes.Messenger1.service")).unwrap();
    assert!(text.contains("[D-BUS Service]"));
    assert!(text.lines().any(|l| l == "Name=org.nes.Messenger1"));
    assert!(text.lines().any(|l| l == "SystemdService=nesd.service"));
    let nesd = std::fs::read_to_string(root().join("systemd/nesd.service")).unwrap();
    assert!(nesd.lines().any(|l| l == "BusName=org.nes.Messenger1"));
    assert!(nesd.lines().any(|l| l == "Type=notify"));
}

#[test]
fn keyserver_unit_exposure_stays_low() {
    let (_dir, units) = units_in_copy();
    let unit = units
        .iter()
        .find(|u| u.ends_with("nes-keyserver.service"))
        .expect("keyserver unit");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score in: {stdout}"));
    // "→ Overall exposure level for nes-keyserver.service: 1.2 OK 🙂"
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unreadable score line: {line}"));
    println!("{line}");
    assert!(
        score <= 2.0,
        "exposure {score} > 2.0: hardening regressed ({line})"
    );
    for must in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "LoadCredential=server-key:",
    ] {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(text.lines().any(|l| l.starts_with(must)), "{must} missing");
    }
}
