//! The offline tools, driven exactly as outside checks drive them: `nes generate`,
//! `nes frame seal`, `nes frame open`, against the original's vector keys and frames.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn nes() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nes"))
}

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto/tests/vectors/legacy-v1")
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generate_writes_the_four_files_with_private_modes_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = nes().args(["generate", "--user", "Alice", "--data-dir"]).arg(&data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = data.join("keys");
    assert_eq!(mode(&keys), 0o700);
    for (file, private) in [("alice-rsa-message", true), ("alice-rsa-message.pub", false), ("alice-rsa-sign", true), ("alice-rsa-sign.pub", false)] {
        let path = keys.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        if private {
            assert_eq!(mode(&path), 0o600, "{file}");
            assert!(text.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"), "{file}");
            assert_eq!(nes_proto::PrivateKey::from_pem(&text).unwrap().bits(), 2048);
        } else {
            assert!(text.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{file}");
        }
    }
    let before = std::fs::read(keys.join("alice-rsa-sign")).unwrap();
    let again = nes().args(["generate", "--user", "alice", "--data-dir"]).arg(&data).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(keys.join("alice-rsa-sign")).unwrap(), before, "nothing changed");
    let forced = nes().args(["generate", "--user", "alice", "--force", "--data-dir"]).arg(&data).output().unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read(keys.join("alice-rsa-sign")).unwrap(), before);
}

#[test]
fn generate_refuses_bad_names_and_sizes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for args in [["--user", "a b", "--size", "2048"], ["--user", "bob", "--size", "1024"]] {
        let out = nes().arg("generate").args(args).arg("--data-dir").arg(dir.path().join("d")).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
        assert!(!dir.path().join("d").exists(), "{args:?} created files");
    }
    let out = nes().args(["generate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "missing --user is bad usage");
}

#[test]
fn frame_open_prints_the_exact_inner_bytes_of_original_frames() {
    let v = vectors();
    for n in 1..=5 {
        let frame = std::fs::read(v.join(format!("frames/frame-{n:02}.json"))).unwrap();
        let expected = std::fs::read(v.join(format!("frames/frame-{n:02}.expected.json"))).unwrap();
        let mut cmd = nes();
        cmd.args(["frame", "open", "--me", "bob", "--key"])
            .arg(v.join("keys/bob-rsa-message"))
            .arg("--sender-key")
            .arg(v.join("keys/alice-rsa-sign.pub"));
        let out = run_with_stdin(cmd, &frame);
        assert!(out.status.success(), "frame {n}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout.strip_suffix(b"\n").unwrap(), &expected[..], "frame {n}");
    }
}

#[test]
fn frame_open_refuses_with_one_line_and_exit_1() {
    let v = vectors();
    let frame = std::fs::read(v.join("frames/frame-01.json")).unwrap();
    let cases: [(&str, &str, &[u8], Option<&str>); 4] = [
        ("keys/bob-rsa-message", "keys/bob-rsa-sign.pub", &frame, None),   // wrong sender
        ("keys/bob-rsa-message", "keys/alice-rsa-sign.pub", &frame, Some("carol")), // not for carol
        ("keys/alice-rsa-message", "keys/alice-rsa-sign.pub", &frame, None), // not our key
        ("keys/bob-rsa-message", "keys/alice-rsa-sign.pub", b"{garbage", None),
    ];
    for (key, sender, input, me) in cases {
        let mut cmd = nes();
        cmd.args(["frame", "open", "--key"]).arg(v.join(key)).arg("--sender-key").arg(v.join(sender));
        if let Some(me) = me {
            cmd.args(["--me", me]);
        }
        let out = run_with_stdin(cmd, input);
        assert_eq!(out.status.code(), Some(1), "{key} {sender} {me:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn seal_then_open_round_trips_in_both_versions_from_args_and_stdin() {
    let v = vectors();
    for v1 in [false, true] {
        let mut seal = nes();
        seal.args(["frame", "seal", "--from", "alice", "--to", "bob", "--to-key"])
            .arg(v.join("keys/bob-rsa-message.pub"))
            .arg("--sign-key")
            .arg(v.join("keys/alice-rsa-sign"));
        if v1 {
            seal.arg("--v1");
        }
        let sealed = run_with_stdin(seal, "zażółć 🙂\n".as_bytes());
        assert!(sealed.status.success(), "{}", String::from_utf8_lossy(&sealed.stderr));
        let frame = String::from_utf8(sealed.stdout).unwrap();
        assert_eq!(frame.lines().count(), 1);
        assert_eq!(frame.contains("\"v\":2"), !v1);
        let mut open = nes();
        open.args(["frame", "open", "--me", "bob", "--key"])
            .arg(v.join("keys/bob-rsa-message"))
            .arg("--sender-key")
            .arg(v.join("keys/alice-rsa-sign.pub"));
        let opened = run_with_stdin(open, frame.as_bytes());
        assert!(opened.status.success(), "{}", String::from_utf8_lossy(&opened.stderr));
        let inner: serde_json::Value = serde_json::from_slice(&opened.stdout).unwrap();
        assert_eq!(inner["message"], "zażółć 🙂");
        assert_eq!(inner["from"], "alice");
        assert_eq!(inner["to"], "bob");
    }
    let mut seal = nes();
    seal.args(["frame", "seal", "--from", "alice", "--to", "bob", "-m", "hi", "--to-key"])
        .arg(v.join("keys/bob-rsa-message.pub"))
        .arg("--sign-key")
        .arg(v.join("keys/bob-rsa-message.pub"));
    let out = run_with_stdin(seal, b"");
    assert_eq!(out.status.code(), Some(1), "a public key is not a signing key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sign-key"));
}
