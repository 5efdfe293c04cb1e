//! The offline tools, driven exactly as outside checks drive them: `nes generate`,
//! `nes frame seal`, `nes frame open`, against the original's vector keys and frames;
//! and v3: `nes prekey new`, `nes frame seal --v3`, `nes frame open --data-dir`.

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
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments exits without reading stdin: a broken pipe
    // here is that, not a failure (the assertions are on its output and exit code).
    match child.stdin.take().unwrap().write_all(stdin) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    child.wait_with_output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generate_writes_the_four_files_with_private_modes_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = nes()
        .args(["generate", "--user", "Alice", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = data.join("keys");
    assert_eq!(mode(&keys), 0o700);
    for (file, private) in [
        ("alice-rsa-message", true),
        ("alice-rsa-message.pub", false),
        ("alice-rsa-sign", true),
        ("alice-rsa-sign.pub", false),
    ] {
        let path = keys.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        if private {
            assert_eq!(mode(&path), 0o600, "{file}");
            assert!(
                text.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"),
                "{file}"
            );
            assert_eq!(nes_proto::PrivateKey::from_pem(&text).unwrap().bits(), 2048);
        } else {
            assert!(text.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{file}");
        }
    }
    let before = std::fs::read(keys.join("alice-rsa-sign")).unwrap();
    let again = nes()
        .args(["generate", "--user", "alice", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(keys.join("alice-rsa-sign")).unwrap(),
        before,
        "nothing changed"
    );
    let forced = nes()
        .args(["generate", "--user", "alice", "--force", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read(keys.join("alice-rsa-sign")).unwrap(), before);
}

#[test]
fn generate_refuses_bad_names_and_sizes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        ["--user", "a b", "--size", "2048"],
        ["--user", "bob", "--size", "1024"],
    ] {
        let out = nes()
            .arg("generate")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .output()
            .unwrap();
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
        assert!(
            out.status.success(),
            "frame {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout.strip_suffix(b"\n").unwrap(),
            &expected[..],
            "frame {n}"
        );
    }
}

#[test]
fn frame_open_refuses_with_one_line_and_exit_1() {
    let v = vectors();
    let frame = std::fs::read(v.join("frames/frame-01.json")).unwrap();
    let cases: [(&str, &str, &[u8], Option<&str>); 4] = [
        (
            "keys/bob-rsa-message",
            "keys/bob-rsa-sign.pub",
            &frame,
            None,
        ), // wrong sender
        (
            "keys/bob-rsa-message",
            "keys/alice-rsa-sign.pub",
            &frame,
            Some("carol"),
        ), // not for carol
        (
            "keys/alice-rsa-message",
            "keys/alice-rsa-sign.pub",
            &frame,
            None,
        ), // not our key
        (
            "keys/bob-rsa-message",
            "keys/alice-rsa-sign.pub",
            b"{garbage",
            None,
        ),
    ];
    for (key, sender, input, me) in cases {
        let mut cmd = nes();
        cmd.args(["frame", "open", "--key"])
            .arg(v.join(key))
            .arg("--sender-key")
            .arg(v.join(sender));
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
        seal.args([
            "frame", "seal", "--from", "alice", "--to", "bob", "--to-key",
        ])
        .arg(v.join("keys/bob-rsa-message.pub"))
        .arg("--sign-key")
        .arg(v.join("keys/alice-rsa-sign"));
        if v1 {
            seal.arg("--v1");
        }
        let sealed = run_with_stdin(seal, "zażółć 🙂\n".as_bytes());
        assert!(
            sealed.status.success(),
            "{}",
            String::from_utf8_lossy(&sealed.stderr)
        );
        let frame = String::from_utf8(sealed.stdout).unwrap();
        assert_eq!(frame.lines().count(), 1);
        assert_eq!(frame.contains("\"v\":2"), !v1);
        let mut open = nes();
        open.args(["frame", "open", "--me", "bob", "--key"])
            .arg(v.join("keys/bob-rsa-message"))
            .arg("--sender-key")
            .arg(v.join("keys/alice-rsa-sign.pub"));
        let opened = run_with_stdin(open, frame.as_bytes());
        assert!(
            opened.status.success(),
            "{}",
            String::from_utf8_lossy(&opened.stderr)
        );
        let inner: serde_json::Value = serde_json::from_slice(&opened.stdout).unwrap();
        assert_eq!(inner["message"], "zażółć 🙂");
        assert_eq!(inner["from"], "alice");
        assert_eq!(inner["to"], "bob");
    }
    let mut seal = nes();
    seal.args([
        "frame", "seal", "--from", "alice", "--to", "bob", "-m", "hi", "--to-key",
    ])
    .arg(v.join("keys/bob-rsa-message.pub"))
    .arg("--sign-key")
    .arg(v.join("keys/bob-rsa-message.pub"));
    let out = run_with_stdin(seal, b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a public key is not a signing key"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sign-key"));
}

fn generate(user: &str, data: &Path) {
    let out = nes()
        .args(["generate", "--user", user, "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nes prekey new`: the printed signed prekey, and the one file it made in DIR/keys/prekeys.
fn prekey_new(user: &str, data: &Path) -> (Vec<u8>, PathBuf) {
    let before = std::fs::read_dir(data.join("keys/prekeys"))
        .map(|d| d.count())
        .unwrap_or(0);
    let out = nes()
        .args(["prekey", "new", "--user", user, "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        before + 1,
        std::fs::read_dir(data.join("keys/prekeys"))
            .unwrap()
            .count()
    );
    let doc = out.stdout.trim_ascii_end().to_vec();
    let parsed = nes_proto::v3::SignedPrekey::parse(&doc).unwrap();
    let file = data.join("keys/prekeys").join(format!(
        "{}.json",
        nes_proto::v3::id_hex(&parsed.prekey().id)
    ));
    (doc, file)
}

fn seal_v3(
    from: &str,
    from_dir: &Path,
    to: &str,
    prekey_file: &Path,
    to_sign_pub: &Path,
    text: Option<&str>,
) -> Output {
    let mut cmd = nes();
    cmd.args([
        "frame",
        "seal",
        "--v3",
        "--from",
        from,
        "--to",
        to,
        "--to-prekey",
    ])
    .arg(prekey_file)
    .arg("--to-sign-key")
    .arg(to_sign_pub)
    .arg("--data-dir")
    .arg(from_dir);
    if let Some(text) = text {
        cmd.args(["-m", text]);
    }
    run_with_stdin(cmd, b"from stdin\n")
}

fn open_dir(dir: &Path, sender_pub: &Path, me: Option<&str>, frame: &[u8]) -> Output {
    let mut cmd = nes();
    cmd.args(["frame", "open", "--data-dir"])
        .arg(dir)
        .arg("--sender-key")
        .arg(sender_pub);
    if let Some(me) = me {
        cmd.args(["--me", me]);
    }
    run_with_stdin(cmd, frame)
}

fn one_line_refusal(out: &Output, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn v3_prekey_seal_and_open_from_data_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    generate("alice", &a);
    generate("bob", &b);
    let (bob_doc, bob_file) = prekey_new("bob", &b);
    prekey_new("alice", &a);

    // The files and folders nes prekey new made, and what the prekey file holds.
    for folder in ["keys/prekeys", "keys/certificates"] {
        assert_eq!(mode(&b.join(folder)), 0o700, "{folder}");
        for entry in std::fs::read_dir(b.join(folder)).unwrap() {
            assert_eq!(mode(&entry.unwrap().path()), 0o600, "{folder}");
        }
    }
    assert_eq!(mode(&bob_file), 0o600);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bob_file).unwrap()).unwrap();
    assert_eq!(
        nes_proto::b64::decode(file["mlkem768"].as_str().unwrap())
            .unwrap()
            .len(),
        2400
    );
    assert_eq!(
        nes_proto::b64::decode(file["x25519"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    let bob_sign_pub = b.join("keys/bob-rsa-sign.pub");
    let parsed = nes_proto::v3::SignedPrekey::parse(&bob_doc).unwrap();
    parsed
        .verify(&nes_proto::PublicKey::read(&bob_sign_pub).unwrap())
        .unwrap();
    let prekey_doc = dir.path().join("bob-prekey.json");
    std::fs::write(&prekey_doc, [&bob_doc[..], b"\n"].concat()).unwrap();

    let alice_sign_pub = a.join("keys/alice-rsa-sign.pub");
    let sealed = seal_v3(
        "alice",
        &a,
        "bob",
        &prekey_doc,
        &bob_sign_pub,
        Some("hello in v3"),
    );
    assert!(
        sealed.status.success(),
        "{}",
        String::from_utf8_lossy(&sealed.stderr)
    );
    let frame = sealed.stdout;
    assert!(frame.starts_with(b"{\"v\":3,"));
    let opened = open_dir(&b, &alice_sign_pub, Some("bob"), &frame);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let inner: serde_json::Value = serde_json::from_slice(&opened.stdout).unwrap();
    assert_eq!(inner["message"], "hello in v3");
    assert_eq!(inner["from"], "alice");
    assert_eq!(inner["to"], "bob");
    // Text from stdin when -m is absent; --me is optional.
    let sealed = seal_v3("alice", &a, "bob", &prekey_doc, &bob_sign_pub, None);
    assert!(
        sealed.status.success(),
        "{}",
        String::from_utf8_lossy(&sealed.stderr)
    );
    let opened = open_dir(&b, &alice_sign_pub, None, &sealed.stdout);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&opened.stdout).unwrap()["message"],
        "from stdin"
    );

    // Refusals: the wrong directory, the wrong sender key, someone else's --me.
    one_line_refusal(
        &open_dir(&a, &alice_sign_pub, None, &frame),
        "unknown_prekey",
    );
    one_line_refusal(&open_dir(&b, &bob_sign_pub, None, &frame), "signature");
    one_line_refusal(
        &open_dir(&b, &alice_sign_pub, Some("carol"), &frame),
        "misaddressed",
    );
    // The old --key form does not hold prekeys.
    let mut cmd = nes();
    cmd.args(["frame", "open", "--key"])
        .arg(b.join("keys/bob-rsa-message"))
        .arg("--sender-key")
        .arg(&alice_sign_pub);
    one_line_refusal(&run_with_stdin(cmd, &frame), "prekey");

    // Sealing refuses a prekey the given sign key did not sign, or for someone else, and
    // a sender without a certificate.
    one_line_refusal(
        &seal_v3("alice", &a, "bob", &prekey_doc, &alice_sign_pub, Some("x")),
        "--to-prekey",
    );
    one_line_refusal(
        &seal_v3("alice", &a, "carol", &prekey_doc, &bob_sign_pub, Some("x")),
        "--to-prekey",
    );
    let c = dir.path().join("carol");
    generate("carol", &c);
    one_line_refusal(
        &seal_v3("carol", &c, "bob", &prekey_doc, &bob_sign_pub, Some("x")),
        "nes prekey new",
    );
    one_line_refusal(
        &seal_v3(
            "alice",
            &a,
            "bob",
            &a.join("keys/alice-rsa-sign.pub"),
            &bob_sign_pub,
            Some("x"),
        ),
        "--to-prekey",
    );

    // After the prekey file is deleted, nothing left in bob's directory opens the frame.
    std::fs::remove_file(&bob_file).unwrap();
    one_line_refusal(
        &open_dir(&b, &alice_sign_pub, Some("bob"), &frame),
        "unknown_prekey",
    );
    prekey_new("bob", &b);
    one_line_refusal(
        &open_dir(&b, &alice_sign_pub, Some("bob"), &frame),
        "unknown_prekey",
    );
}

#[test]
fn data_dir_open_also_opens_v1_and_v2_with_the_message_key() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("alice"), dir.path().join("bob"));
    generate("alice", &a);
    generate("bob", &b);
    for v1 in [false, true] {
        let mut seal = nes();
        seal.args([
            "frame",
            "seal",
            "--from",
            "alice",
            "--to",
            "bob",
            "-m",
            "old school",
            "--to-key",
        ])
        .arg(b.join("keys/bob-rsa-message.pub"))
        .arg("--sign-key")
        .arg(a.join("keys/alice-rsa-sign"));
        if v1 {
            seal.arg("--v1");
        }
        let sealed = run_with_stdin(seal, b"");
        assert!(
            sealed.status.success(),
            "{}",
            String::from_utf8_lossy(&sealed.stderr)
        );
        for me in [Some("bob"), None] {
            let opened = open_dir(&b, &a.join("keys/alice-rsa-sign.pub"), me, &sealed.stdout);
            assert!(
                opened.status.success(),
                "{me:?}: {}",
                String::from_utf8_lossy(&opened.stderr)
            );
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&opened.stdout).unwrap()["message"],
                "old school"
            );
        }
        one_line_refusal(
            &open_dir(&a, &a.join("keys/alice-rsa-sign.pub"), None, &sealed.stdout),
            "refused",
        );
    }
}

#[test]
fn v3_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "frame", "seal", "--v3", "--from", "alice", "--to", "bob", "-m", "x",
        ],
        vec![
            "frame",
            "seal",
            "--v3",
            "--v1",
            "--from",
            "alice",
            "--to",
            "bob",
            "--to-prekey",
            "p",
            "--to-sign-key",
            "k",
            "--data-dir",
            "d",
        ],
        vec![
            "frame",
            "seal",
            "--from",
            "alice",
            "--to",
            "bob",
            "--to-prekey",
            "p",
        ],
        vec!["frame", "open", "--sender-key", "k"],
        vec!["prekey", "new", "--data-dir", "d"],
        vec!["prekey", "new", "--user", "bob", "--rotation", "7w"],
    ];
    for args in cases {
        let out = nes()
            .args(&args)
            .env_remove("NES_USER")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A user without an identity is a fixable error, with the command that fixes it.
    let out = nes()
        .args(["prekey", "new", "--user", "bob", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nes generate"));
    assert!(!dir.path().join("keys/prekeys").exists());
}
