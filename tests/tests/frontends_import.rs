//! `nes import-legacy`: an identity of the original client (`~/.nes/` with the vector
//! keys made by the original Go code, and its dotenv config) is brought over into a temp
//! HOME, and then a nesd started from nothing but the imported config works with it.

use anyhow::Result;
use nes_e2e::frontends::{json_lines, run_nes};
use nes_e2e::{eventually, history, send, vectors, Nesd, World, TIMEOUT};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `~/.nes` laid out as the original client leaves it for `user`.
fn legacy_home(home: &Path, users: &[&str], config: &str) -> Result<PathBuf> {
    let dir = home.join(".nes");
    std::fs::create_dir_all(&dir)?;
    for user in users {
        for suffix in ["rsa-message", "rsa-message.pub", "rsa-sign", "rsa-sign.pub"] {
            let name = format!("{user}-{suffix}");
            std::fs::copy(vectors().join("keys").join(&name), dir.join(&name))?;
        }
    }
    std::fs::write(dir.join("config"), config)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_identity_is_imported_and_then_used_by_nesd() -> Result<()> {
    let world = World::start().await?;
    let home = tempfile::tempdir()?;
    let h = home.path();
    let none = h.join("none.sock");
    let config = format!(
        "# written by the original client\nNES_USERNAME = alice\nMQTT_BROKER_ADDRESS = tcp://{}\nPUBKEY_ADDRESS = {}/\n",
        world.broker.url().trim_start_matches("mqtt://"),
        world.keyserver.url()
    );
    let legacy = legacy_home(h, &["alice"], &config)?;

    let out = run_nes(&none, h, &["import-legacy"], b"")
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("imported alice"), "{}", out.stdout);
    let keys = h.join(".local/share/nes/keys");
    assert_eq!(mode(&keys), 0o700);
    assert_eq!(mode(keys.parent().unwrap()), 0o700);
    for suffix in ["rsa-message", "rsa-message.pub", "rsa-sign", "rsa-sign.pub"] {
        let name = format!("alice-{suffix}");
        assert_eq!(
            std::fs::read(keys.join(&name))?,
            std::fs::read(legacy.join(&name))?,
            "{name} copied byte for byte"
        );
        assert_eq!(mode(&keys.join(&name)), 0o600, "{name}");
    }
    let toml = std::fs::read_to_string(h.join(".config/nes/config.toml"))?;
    assert!(toml.contains("user = \"alice\""), "{toml}");
    assert!(
        toml.contains(&format!("broker = \"{}\"", world.broker.url())),
        "tcp:// becomes mqtt://: {toml}"
    );
    assert!(
        toml.contains(&format!("keyserver = \"{}\"", world.keyserver.url())),
        "{toml}"
    );
    assert!(
        legacy.join("alice-rsa-sign").exists(),
        "the original folder is left as it was"
    );

    // Never overwritten without --force.
    let out = run_nes(&none, h, &["import-legacy"], b"")
        .await?
        .expect_code(1)?;
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    run_nes(&none, h, &["import-legacy", "--force"], b"")
        .await?
        .expect_code(0)?;

    // A nesd started from the imported config alone (plus the key server's key, which
    // the original compiled in) is alice, with the original keys.
    world
        .keyserver
        .register_and_activate(
            "alice",
            &std::fs::read_to_string(legacy.join("alice-rsa-message.pub"))?,
            &std::fs::read_to_string(legacy.join("alice-rsa-sign.pub"))?,
        )
        .await?;
    let bob = world.vector_identity("bob").await?;
    let bob_d = Nesd::start(&bob, &world.broker, &world.keyserver).await?;
    let alice_d = Nesd::with_config(&h.join(".config/nes/config.toml"))
        .arg("--keyserver-key")
        .arg(world.keyserver.public_key_path())
        .env("HOME", h)
        .env("XDG_DATA_HOME", h.join(".local/share"))
        .env("XDG_CONFIG_HOME", h.join(".config"))
        .start()
        .await?;
    let a = alice_d.socket();
    let out = run_nes(&a, h, &["status", "--json"], b"")
        .await?
        .expect_code(0)?;
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(status["user"], "alice");
    assert_eq!(status["broker"], world.broker.url());

    let mut bob_client = bob_d.client().await?;
    send(&mut bob_client, "alice", "welcome back, alice").await?;
    run_nes(&a, h, &["send", "bob", "thanks, bob"], b"")
        .await?
        .expect_code(0)?;
    let lines = eventually(
        "alice's imported identity received bob's message",
        TIMEOUT,
        || async {
            let out = run_nes(&a, h, &["history", "bob", "--json"], b"").await?;
            let lines = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
            Ok(lines
                .iter()
                .any(|l| l["message"] == "welcome back, alice")
                .then_some(lines))
        },
    )
    .await?;
    assert!(lines
        .iter()
        .any(|l| l["message"] == "thanks, bob" && l["direction"] == "outgoing"));
    eventually("bob received alice's answer", TIMEOUT, || {
        let mut c = bob_client.clone();
        async move {
            Ok(history(&mut c, "alice")
                .await?
                .iter()
                .any(|m| m.text == "thanks, bob")
                .then_some(()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_or_ambiguous_original_folders_are_refused_with_a_reason() -> Result<()> {
    let none = Path::new("/nonexistent/nesd.sock");

    // No ~/.nes at all.
    let home = tempfile::tempdir()?;
    let out = run_nes(none, home.path(), &["import-legacy"], b"")
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains(".nes does not exist"), "{}", out.stderr);

    // Two identities and no username in the config: choose one with -u.
    let home = tempfile::tempdir()?;
    legacy_home(
        home.path(),
        &["alice", "bob"],
        "MQTT_BROKER_ADDRESS=test.mosquitto.org\n",
    )?;
    let out = run_nes(none, home.path(), &["import-legacy"], b"")
        .await?
        .expect_code(1)?;
    assert!(
        out.stderr.contains("several identities") && out.stderr.contains("-u"),
        "{}",
        out.stderr
    );
    let out = run_nes(none, home.path(), &["import-legacy", "-u", "bob"], b"")
        .await?
        .expect_code(0)?;
    assert!(
        out.stdout
            .contains("broker = \"mqtt://test.mosquitto.org:1883\""),
        "a bare host gets the default port: {}",
        out.stdout
    );

    // A public key that belongs to another private key.
    let home = tempfile::tempdir()?;
    let dir = legacy_home(home.path(), &["alice"], "USERNAME=alice\n")?;
    std::fs::copy(
        vectors().join("keys/bob-rsa-sign.pub"),
        dir.join("alice-rsa-sign.pub"),
    )?;
    let out = run_nes(none, home.path(), &["import-legacy"], b"")
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("does not belong"), "{}", out.stderr);
    assert!(
        !home.path().join(".local/share/nes/keys").exists(),
        "nothing written on refusal"
    );

    // A missing private key; a missing public key is derived instead.
    let home = tempfile::tempdir()?;
    let dir = legacy_home(home.path(), &["alice"], "NES_USERNAME=alice\n")?;
    std::fs::remove_file(dir.join("alice-rsa-message.pub"))?;
    run_nes(none, home.path(), &["import-legacy"], b"")
        .await?
        .expect_code(0)?;
    let derived = std::fs::read_to_string(
        home.path()
            .join(".local/share/nes/keys/alice-rsa-message.pub"),
    )?;
    assert!(derived.starts_with("-----BEGIN PUBLIC KEY-----"));
    std::fs::remove_file(dir.join("alice-rsa-sign"))?;
    let out = run_nes(none, home.path(), &["import-legacy", "--force"], b"")
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("alice-rsa-sign"), "{}", out.stderr);

    // A config.toml that already names someone else is not overwritten without --force.
    let home = tempfile::tempdir()?;
    legacy_home(home.path(), &["alice"], "NES_USERNAME=alice\n")?;
    std::fs::create_dir_all(home.path().join(".config/nes"))?;
    std::fs::write(
        home.path().join(".config/nes/config.toml"),
        "user = \"carol\"\n",
    )?;
    let out = run_nes(none, home.path(), &["import-legacy"], b"")
        .await?
        .expect_code(1)?;
    assert!(
        out.stderr.contains("user = \"carol\"") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    Ok(())
}
