//! The `nes` CLI's daemon commands, driven exactly as users and outside checks drive
//! them (frontends/README.md "`nes` commands"), against real daemons, a real broker and a
//! real key server; and every command's bad input with its exit code and message.

use anyhow::Result;
use nes_e2e::frontends::{json_lines, run_nes, Outcome};
use nes_e2e::{eventually, history, Identity, Nesd, World, TIMEOUT};
use std::path::Path;

async fn nes(socket: &Path, home: &Path, args: &[&str]) -> Result<Outcome> {
    run_nes(socket, home, args, b"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_daemon_every_daemon_command_exits_3_and_says_how_to_start_it() -> Result<()> {
    let home = tempfile::tempdir()?;
    let socket = home.path().join("no-daemon.sock");
    let commands: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["register", "-e", "a@example.org"],
        &["send", "bob", "hi"],
        &["send", "-t", "bob", "-m", "hi"],
        &["send", "--batch"],
        &["history", "bob", "--json"],
        &["history"],
        &["listen", "--json"],
        &["listen", "--json", "--count", "1", "--timeout", "5"],
        &["chat", "-t", "bob"],
        &["contacts"],
        &["contacts", "show", "bob"],
    ];
    for args in commands {
        let out = nes(&socket, home.path(), args).await?.expect_code(3)?;
        assert!(
            out.stderr.contains("nesd is not running"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("systemctl --user start nesd")
                && out.stderr.contains("nesd --user"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{args:?}");
    }
    // A stale socket (a daemon killed without cleaning up) is "not running" too.
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    let out = nes(&socket, home.path(), &["status"])
        .await?
        .expect_code(3)?;
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    // `version` answers without a daemon.
    let out = nes(&socket, home.path(), &["version"])
        .await?
        .expect_code(0)?;
    assert!(
        out.stdout.contains("nes ") && out.stdout.contains("not running"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_exits_2_before_touching_the_daemon() -> Result<()> {
    let home = tempfile::tempdir()?;
    let socket = home.path().join("no-daemon.sock");
    let commands: &[&[&str]] = &[
        &["--bogus"],
        &["status", "--bogus"],
        &["send"],
        &["send", "bob", "x", "-m", "y"],
        &["send", "--batch", "bob"],
        &["history", "bob", "--last", "many"],
        &["listen", "--count", "x"],
        &["listen", "--since", "-1"],
        &["register"],
        &["chat"],
        &["contacts", "legacy", "bob", "maybe"],
        &["config", "set", "broker"],
        &["completions", "tcsh"],
        &["import-legacy", "--bogus"],
        &["nosuchcommand"],
    ];
    for args in commands {
        let out = nes(&socket, home.path(), args).await?;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(!out.stderr.trim().is_empty(), "{args:?} says what is wrong");
        assert!(!out.stderr.contains("panicked"), "{args:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_send_history_batch_contacts_register_through_the_cli() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let (a, b, h) = (alice_d.socket(), bob_d.socket(), home.path());

    // status: text and JSON, exit 0.
    let out = nes(&a, h, &["status"]).await?.expect_code(0)?;
    assert!(out.stdout.contains("user:       alice"), "{}", out.stdout);
    let out = nes(
        &a,
        h,
        &["--socket", a.to_str().unwrap(), "status", "--json"],
    )
    .await?
    .expect_code(0)?;
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(status["user"], "alice");
    assert!(
        status["refused"].is_object() && status["queued"].is_u64() && status["pid"].is_u64(),
        "{status}"
    );

    // The four ways to send, and bad input.
    nes(&a, h, &["send", "bob", "one", "two"])
        .await?
        .expect_code(0)?;
    run_nes(&a, h, &["send", "bob"], b"from stdin\n")
        .await?
        .expect_code(0)?;
    let out = nes(&a, h, &["send", "-t", "bob", "-m", "with flags"])
        .await?
        .expect_code(0)?;
    let id = out.stdout.trim().to_string();
    assert!(
        id.ends_with("==") && id.len() == 24,
        "the id is printed: {id}"
    );
    let out = nes(&a, h, &["send", "--json", "--wait", "bob", "json and wait"])
        .await?
        .expect_code(0)?;
    let sent: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(sent["message"], "json and wait");
    assert_eq!(sent["direction"], "outgoing");

    let out = nes(&a, h, &["send", "zed-nobody", "hi"])
        .await?
        .expect_code(1)?;
    assert!(
        out.stderr.contains("zed-nobody"),
        "unknown peer is named: {}",
        out.stderr
    );
    let out = run_nes(&a, h, &["send", "bob"], b"\n")
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("empty message"), "{}", out.stderr);
    let out = nes(&a, h, &["send", "bob", ""]).await?.expect_code(1)?;
    assert!(out.stderr.contains("empty message"), "{}", out.stderr);
    let out = nes(&a, h, &["send", "B@d!", "hi"]).await?.expect_code(1)?;
    assert!(out.stderr.contains("B@d!"), "{}", out.stderr);

    // bob sees them in order, once, in the JSON line format.
    let texts = ["one two", "from stdin", "with flags", "json and wait"];
    let mut bob_client = bob_d.client().await?;
    eventually("bob has 4 messages", TIMEOUT, || {
        let mut c = bob_client.clone();
        async move { Ok((history(&mut c, "alice").await?.len() >= 4).then_some(())) }
    })
    .await?;
    let out = nes(&b, h, &["history", "alice", "--json", "--keep-unread"])
        .await?
        .expect_code(0)?;
    let lines: Vec<String> = out.stdout.lines().map(String::from).collect();
    let messages = json_lines(&lines)?;
    assert_eq!(
        messages
            .iter()
            .map(|m| m["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        texts
    );
    for m in &messages {
        for field in [
            "id",
            "from",
            "to",
            "timestamp",
            "message",
            "direction",
            "state",
        ] {
            assert!(m.get(field).is_some(), "{field} in {m}");
        }
        assert_eq!(m["from"], "alice");
        assert_eq!(m["to"], "bob");
        assert_eq!(m["direction"], "incoming");
        assert_eq!(m["state"], "received");
        assert!(m["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
    }
    assert_eq!(messages[2]["id"], id.as_str());
    let out = nes(
        &b,
        h,
        &["history", "alice", "--last", "2", "--json", "--keep-unread"],
    )
    .await?
    .expect_code(0)?;
    let last: Vec<_> = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    assert_eq!(
        last.iter()
            .map(|m| m["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        &texts[2..]
    );
    let out = nes(&b, h, &["history"]).await?.expect_code(0)?;
    assert!(out.stdout.contains("alice (4 unread)"), "{}", out.stdout);
    // Showing the conversation (without --keep-unread) marks it read.
    let out = nes(&b, h, &["history", "alice"]).await?.expect_code(0)?;
    assert!(
        out.stdout.contains("alice → bob: one two"),
        "{}",
        out.stdout
    );
    let out = nes(&b, h, &["history"]).await?.expect_code(0)?;
    assert!(!out.stdout.contains("unread"), "{}", out.stdout);
    let out = nes(&b, h, &["history", "not valid!"])
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("not valid!"), "{}", out.stderr);
    // alice's own side: outgoing, delivered eventually.
    let out = nes(&a, h, &["history", "bob", "--json"])
        .await?
        .expect_code(0)?;
    assert!(out.stdout.lines().count() >= 4);
    assert!(
        out.stdout.contains("\"direction\":\"outgoing\""),
        "{}",
        out.stdout
    );

    // --batch: one result line per input line, in order; bad lines do not stop it; exit 1.
    let batch = "{\"to\":\"bob\",\"message\":\"b1\"}\nnot json\n\n{\"to\":\"zed-nobody\",\"message\":\"x\"}\n{\"to\":\"bob\",\"message\":\"\"}\n{\"to\":\"bob\",\"message\":\"b2\"}\n";
    let out = run_nes(&a, h, &["send", "--batch"], batch.as_bytes())
        .await?
        .expect_code(1)?;
    let results = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    assert_eq!(
        results.len(),
        5,
        "blank lines give no result: {}",
        out.stdout
    );
    assert_eq!(
        results
            .iter()
            .map(|r| r["line"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 4, 5, 6]
    );
    assert_eq!(
        results
            .iter()
            .map(|r| r["ok"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [true, false, false, false, true]
    );
    assert!(results[0]["id"].as_str().unwrap().ends_with("=="));
    assert_eq!(results[2]["code"], "not_found", "{}", results[2]);
    assert!(out.stderr.contains("3 message(s)"), "{}", out.stderr);
    let out = run_nes(
        &a,
        h,
        &["send", "--batch"],
        b"{\"to\":\"bob\",\"message\":\"b3\"}\n",
    )
    .await?
    .expect_code(0)?;
    assert_eq!(out.stdout.lines().count(), 1);
    eventually("the batch reached bob", TIMEOUT, || {
        let mut c = bob_client.clone();
        async move {
            let texts: Vec<String> = history(&mut c, "alice")
                .await?
                .into_iter()
                .map(|m| m.text)
                .collect();
            Ok(
                (texts.ends_with(&["b1".to_string(), "b2".to_string(), "b3".to_string()]))
                    .then_some(()),
            )
        }
    })
    .await?;
    bob_client = bob_d.client().await?;
    let _ = &mut bob_client;

    // contacts: list, show with fingerprints, legacy on/off, trust with nothing changed.
    let out = nes(&a, h, &["contacts"]).await?.expect_code(0)?;
    assert!(
        out.stdout.contains("bob") && out.stdout.contains("pinned"),
        "{}",
        out.stdout
    );
    let out = nes(&a, h, &["contacts", "show", "bob", "--json"])
        .await?
        .expect_code(0)?;
    let contact: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    assert_eq!(
        contact["message_key_fingerprint"].as_str().unwrap().len(),
        64,
        "{contact}"
    );
    let out = nes(&a, h, &["contacts", "show", "bob"])
        .await?
        .expect_code(0)?;
    assert!(
        out.stdout.contains("message key: sha256:"),
        "{}",
        out.stdout
    );
    let out = nes(&a, h, &["contacts", "legacy", "bob", "on"])
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("legacy (v1)"), "{}", out.stdout);
    nes(&a, h, &["send", "bob", "as v1"])
        .await?
        .expect_code(0)?;
    nes(&a, h, &["contacts", "legacy", "bob", "off"])
        .await?
        .expect_code(0)?;
    let out = nes(&a, h, &["contacts", "trust", "bob"])
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("have not changed"), "{}", out.stdout);
    let out = nes(&a, h, &["contacts", "show", "zed-nobody"])
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("zed-nobody"), "{}", out.stderr);
    let out = nes(&a, h, &["send", "--legacy", "bob", "legacy flag"])
        .await?
        .expect_code(0)?;
    assert!(!out.stdout.trim().is_empty());
    eventually("v1 messages reached bob", TIMEOUT, || {
        let mut c = bob_client.clone();
        async move {
            let h = history(&mut c, "alice").await?;
            let v1: Vec<_> = h
                .iter()
                .filter(|m| m.wire_version == 1)
                .map(|m| m.text.clone())
                .collect();
            Ok((v1 == ["as v1", "legacy flag"]).then_some(()))
        }
    })
    .await?;

    // register: a fresh identity registers through its daemon; a second time is refused.
    let carol = Identity::generate("carol")?;
    let carol_d = Nesd::start(&carol, &world.broker, &world.keyserver).await?;
    let c = carol_d.socket();
    let out = nes(&c, h, &["register", "-e", "carol@example.org"])
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("carol"), "{}", out.stdout);
    let out = nes(&c, h, &["register", "-e", "carol@example.org"])
        .await?
        .expect_code(1)?;
    assert!(!out.stderr.trim().is_empty());
    let out = nes(&c, h, &["register", "-e", "no-at-sign"])
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("email"), "{}", out.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_completions_man_and_version_work_offline() -> Result<()> {
    let home = tempfile::tempdir()?;
    let h = home.path();
    let socket = h.join("none.sock");
    let config = h.join(".config/nes/config.toml");
    let out = nes(&socket, h, &["config", "path"]).await?.expect_code(0)?;
    assert_eq!(out.stdout.trim(), config.display().to_string());
    nes(
        &socket,
        h,
        &["config", "set", "broker", "mqtt://127.0.0.1:1999"],
    )
    .await?
    .expect_code(0)?;
    nes(&socket, h, &["config", "set", "key_ttl_secs", "60"])
        .await?
        .expect_code(0)?;
    nes(&socket, h, &["config", "set", "notify_mute", "alice,carol"])
        .await?
        .expect_code(0)?;
    let out = nes(&socket, h, &["config", "get", "broker"])
        .await?
        .expect_code(0)?;
    assert_eq!(out.stdout.trim(), "mqtt://127.0.0.1:1999");
    let text = std::fs::read_to_string(&config)?;
    assert!(
        text.contains("key_ttl_secs = 60\n"),
        "a number, not a string: {text}"
    );
    assert!(
        text.contains("notify_mute = [\"alice\", \"carol\"]"),
        "a list: {text}"
    );
    let out = nes(&socket, h, &["config", "set", "brokr", "x"])
        .await?
        .expect_code(1)?;
    assert!(
        out.stderr.contains("unknown setting") && out.stderr.contains("broker"),
        "{}",
        out.stderr
    );
    let out = nes(&socket, h, &["config", "set", "key_ttl_secs", "soon"])
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("whole number"), "{}", out.stderr);
    nes(
        &socket,
        h,
        &["config", "-S", "-u", "alice", "-p", "http://127.0.0.1:8080"],
    )
    .await?
    .expect_code(0)?;
    let out = nes(&socket, h, &["config", "-s"]).await?.expect_code(0)?;
    assert!(
        out.stdout.contains("user = \"alice\"")
            && out.stdout.contains("keyserver = \"http://127.0.0.1:8080\""),
        "{}",
        out.stdout
    );
    nes(&socket, h, &["config", "unset", "broker"])
        .await?
        .expect_code(0)?;
    nes(&socket, h, &["config", "get", "broker"])
        .await?
        .expect_code(1)?;
    // The socket setting of the config file is used by the daemon commands.
    nes(
        &socket,
        h,
        &["config", "set", "socket", "/nonexistent/from-config.sock"],
    )
    .await?;
    let mut cmd = nes_e2e::frontends::nes(&socket, h)?;
    cmd.env_remove("NES_SOCKET").arg("status");
    let out = nes_e2e::frontends::run(cmd, b"").await?.expect_code(3)?;
    assert!(
        out.stderr.contains("/nonexistent/from-config.sock"),
        "{}",
        out.stderr
    );
    std::fs::write(&config, "broken = [")?;
    let out = nes(&socket, h, &["config", "show"]).await?.expect_code(1)?;
    assert!(out.stderr.contains("not valid TOML"), "{}", out.stderr);

    for shell in ["bash", "zsh", "fish"] {
        let out = nes(&socket, h, &["completions", shell])
            .await?
            .expect_code(0)?;
        assert!(
            out.stdout.contains("listen") && out.stdout.contains("import-legacy"),
            "{shell}"
        );
    }
    let man = h.join("man");
    nes(&socket, h, &["man", "--dir", man.to_str().unwrap()])
        .await?
        .expect_code(0)?;
    for page in [
        "nes.1",
        "nes-send.1",
        "nes-listen.1",
        "nes-chat.1",
        "nes-import-legacy.1",
    ] {
        let text = std::fs::read_to_string(man.join(page))?;
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    let out = nes(&socket, h, &["--version"]).await?.expect_code(0)?;
    assert!(out.stdout.starts_with("nes "));
    Ok(())
}

/// `nes history` of a conversation longer than one page, and bigger than gRPC's default
/// 4 MiB reply: 300 messages, the last 40 of them 120 KiB each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_a_long_and_large_conversation_comes_whole_and_in_order() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, _bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let (a, h) = (alice_d.socket(), home.path());
    let mut c = alice_d.client().await?;
    let big = "x".repeat(120 * 1024);
    let mut texts = Vec::new();
    for i in 0..300 {
        let text = if i < 260 {
            format!("short {i:03}")
        } else {
            format!("long {i:03} {big}")
        };
        nes_e2e::send(&mut c, "bob", &text).await?;
        texts.push(text);
    }
    let out = nes(&a, h, &["history", "bob", "--json"])
        .await?
        .expect_code(0)?;
    let lines: Vec<String> = out.stdout.lines().map(String::from).collect();
    let got: Vec<String> = json_lines(&lines)?
        .iter()
        .map(|m| m["message"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(got.len(), 300, "every message, once");
    assert!(got == texts, "in order");
    let out = nes(&a, h, &["history", "bob", "--last", "270", "--json"])
        .await?
        .expect_code(0)?;
    let lines: Vec<String> = out.stdout.lines().map(String::from).collect();
    let got: Vec<String> = json_lines(&lines)?
        .iter()
        .map(|m| m["message"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        got == texts[30..],
        "the last 270 across two pages: got {}",
        got.len()
    );
    Ok(())
}
