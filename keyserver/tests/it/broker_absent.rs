//! A key server built without the `embedded-broker` feature (the default, what
//! `cargo install` builds): `--embedded-broker` is refused at startup with one line that
//! says how to get a binary that has it, before anything is opened.

use crate::common::*;

#[test]
fn embedded_broker_without_the_feature_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ks.db");
    for (flag, env) in [(true, false), (false, true)] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["serve", "--dev", "--listen", "127.0.0.1:0"])
            .args(["--database", &format!("sqlite://{}", db.display())])
            .arg("--key")
            .arg(server_key_file())
            .env_remove("NES_KEYSERVER_EMBEDDED_BROKER");
        if flag {
            cmd.args(["--embedded-broker", "127.0.0.1:0"]);
        }
        if env {
            cmd.env("NES_KEYSERVER_EMBEDDED_BROKER", "127.0.0.1:0");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("built without the embedded broker")
                && text.contains("--features embedded-broker"),
            "{text}"
        );
        assert_eq!(text.trim_end().lines().count(), 1, "{text}");
        assert!(!db.exists(), "the store was opened before the refusal");
    }
}
