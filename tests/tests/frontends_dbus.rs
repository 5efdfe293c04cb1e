//! nesd's D-Bus API (`org.nes.Messenger1`) on a real, private session bus: every method
//! and property through `busctl --user` and `gdbus`, the `MessageReceived` and
//! `PropertiesChanged` signals through `gdbus monitor` and the `examples/dbus-monitor.sh`
//! one-liner; and nesd without any session bus.

use anyhow::{bail, Result};
use nes_e2e::frontends::{examples_dir, run, BusNesd, Lines, SessionBus};
use nes_e2e::{eventually, history, send, Identity, World, TIMEOUT};

const DEST: &str = "org.nes.Messenger1";
const PATH: &str = "/org/nes/Messenger1";

/// `busctl --user ARGS` on the test's bus; fails unless it exits 0.
async fn busctl(bus: &SessionBus, args: &[&str]) -> Result<String> {
    let mut cmd = bus.command("busctl");
    cmd.arg("--user").args(args);
    let out = run(cmd, b"").await?;
    if out.code != 0 {
        bail!("busctl {args:?} failed ({}): {}", out.code, out.stderr);
    }
    Ok(out.stdout.trim().to_string())
}

/// `gdbus ARGS` on the test's bus: (exit code, stdout, stderr).
async fn gdbus(bus: &SessionBus, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = bus.command("gdbus");
    cmd.args(args);
    let out = run(cmd, b"").await?;
    Ok((out.code, out.stdout.trim().to_string(), out.stderr))
}

async fn wait_line(lines: &mut Lines, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
    loop {
        let line = lines
            .next()
            .await
            .map_err(|e| anyhow::anyhow!("waiting for {what}: {e}"))?;
        if pred(&line) {
            return Ok(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_property_and_signal_on_a_real_session_bus() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let bob = Identity::generate("bob")?;
    bob.register(&world.keyserver).await?;
    let bus = SessionBus::start().await?;
    let bob_d = BusNesd::start(
        &bob,
        &world.broker,
        &world.keyserver,
        &[("DBUS_SESSION_BUS_ADDRESS", bus.address())],
    )
    .await?;
    bus.wait_for_name(DEST).await?;

    // Watchers first: gdbus monitor (all signals of the object) and the example one-liner.
    let mut monitor = {
        let mut cmd = bus.command("gdbus");
        cmd.args([
            "monitor",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
        ]);
        Lines::spawn(cmd)?
    };
    wait_line(&mut monitor, "gdbus monitor to start", |l| {
        l.contains("Monitoring signals")
    })
    .await?;
    let mut example =
        Lines::spawn(bus.command(&examples_dir().join("dbus-monitor.sh").display().to_string()))?;
    // dbus-monitor shows its own NameAcquired first: then it is listening.
    wait_line(&mut example, "dbus-monitor to start", |l| {
        l.contains("NameAcquired") || l.contains("member=MessageReceived")
    })
    .await?;

    // Properties before any message.
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "User"]).await?,
        "s \"bob\""
    );
    let connected = busctl(&bus, &["get-property", DEST, PATH, DEST, "Connected"]).await?;
    assert_eq!(connected, "b true");
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "Unread"]).await?,
        "t 0"
    );
    let introspection = busctl(&bus, &["introspect", DEST, PATH]).await?;
    for needle in [
        ".Send",
        ".ListConversations",
        ".History",
        ".MarkRead",
        ".MessageReceived",
        ".User",
        ".Connected",
        ".Unread",
    ] {
        assert!(
            introspection.contains(needle),
            "{needle} in:\n{introspection}"
        );
    }
    let tree = busctl(&bus, &["tree", DEST]).await?;
    assert!(tree.contains(PATH), "{tree}");

    // An incoming message: MessageReceived(id, from, timestamp, text), Unread changes.
    let mut alice = alice_d.client().await?;
    let sent = send(&mut alice, "bob", "hello over dbus").await?;
    let line = wait_line(&mut monitor, "MessageReceived", |l| {
        l.contains("MessageReceived")
    })
    .await?;
    assert!(
        line.contains(&format!("'{}'", sent.id))
            && line.contains("'alice'")
            && line.contains("'hello over dbus'"),
        "{line}"
    );
    assert!(
        line.contains(&format!("int64 {}", sent.timestamp_ms)),
        "{line}"
    );
    let line = wait_line(&mut monitor, "Unread changed", |l| {
        l.contains("PropertiesChanged") && l.contains("Unread")
    })
    .await?;
    assert!(line.contains("<uint64 1>"), "{line}");
    wait_line(&mut example, "the example to print the text", |l| {
        l.contains("\"hello over dbus\"")
    })
    .await?;
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "Unread"]).await?,
        "t 1"
    );

    // Methods through busctl.
    let conversations = busctl(&bus, &["call", DEST, PATH, DEST, "ListConversations"]).await?;
    assert!(
        conversations.starts_with("a(sttxs) 1 \"alice\" 1 1 "),
        "{conversations}"
    );
    assert!(
        conversations.ends_with("\"hello over dbus\""),
        "{conversations}"
    );
    let rows = busctl(
        &bus,
        &["call", DEST, PATH, DEST, "History", "su", "alice", "10"],
    )
    .await?;
    assert!(rows.starts_with("a(sssxsss) 1 "), "{rows}");
    assert!(
        rows.contains("\"hello over dbus\" \"incoming\" \"received\""),
        "{rows}"
    );
    let reply = busctl(
        &bus,
        &[
            "call",
            DEST,
            PATH,
            DEST,
            "Send",
            "ss",
            "alice",
            "hi from busctl",
        ],
    )
    .await?;
    assert!(
        reply.starts_with("s \"") && reply.ends_with("==\""),
        "Send returns the id: {reply}"
    );
    let marked = busctl(&bus, &["call", DEST, PATH, DEST, "MarkRead", "s", "alice"]).await?;
    assert_eq!(marked, "t 1");
    let line = wait_line(&mut monitor, "Unread back to 0", |l| {
        l.contains("PropertiesChanged") && l.contains("Unread")
    })
    .await?;
    assert!(line.contains("<uint64 0>"), "{line}");
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "Unread"]).await?,
        "t 0"
    );

    // The same through gdbus, which reads the introspection to type the arguments.
    let (code, out, err) = gdbus(
        &bus,
        &[
            "call",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
            "--method",
            "org.nes.Messenger1.Send",
            "alice",
            "hi from gdbus",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("('") && out.ends_with("==',)"), "{out}");
    let (code, out, err) = gdbus(
        &bus,
        &[
            "call",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
            "--method",
            "org.nes.Messenger1.History",
            "alice",
            "0",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("'hi from busctl', 'outgoing'") && out.contains("'hi from gdbus', 'outgoing'"),
        "{out}"
    );
    let (code, out, err) = gdbus(
        &bus,
        &[
            "call",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
            "--method",
            "org.freedesktop.DBus.Properties.GetAll",
            DEST,
        ],
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("'User': <'bob'>") && out.contains("'Connected': <true>"),
        "{out}"
    );
    let (code, out, _) = gdbus(
        &bus,
        &[
            "introspect",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
        ],
    )
    .await?;
    assert_eq!(code, 0);
    assert!(
        out.contains("MessageReceived(s id,") || out.contains("MessageReceived("),
        "{out}"
    );

    // Errors carry the service's class and message.
    let (code, _, err) = gdbus(
        &bus,
        &[
            "call",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
            "--method",
            "org.nes.Messenger1.Send",
            "zed-nobody",
            "x",
        ],
    )
    .await?;
    assert_ne!(code, 0);
    assert!(
        err.contains("org.nes.Messenger1.Error.NotFound") && err.contains("zed-nobody"),
        "{err}"
    );
    let (code, _, err) = gdbus(
        &bus,
        &[
            "call",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            PATH,
            "--method",
            "org.nes.Messenger1.Send",
            "alice",
            "",
        ],
    )
    .await?;
    assert_ne!(code, 0);
    assert!(
        err.contains("org.nes.Messenger1.Error.InvalidArgument"),
        "{err}"
    );
    let mut cmd = bus.command("busctl");
    cmd.args([
        "--user",
        "set-property",
        DEST,
        PATH,
        DEST,
        "Unread",
        "t",
        "5",
    ]);
    let out = run(cmd, b"").await?;
    assert_ne!(out.code, 0, "properties are read-only");

    // alice got both sends.
    eventually("alice received the D-Bus sends", TIMEOUT, || {
        let mut c = alice.clone();
        async move {
            let texts: Vec<String> = history(&mut c, "bob")
                .await?
                .into_iter()
                .map(|m| m.text)
                .collect();
            Ok((texts.contains(&"hi from busctl".to_string())
                && texts.contains(&"hi from gdbus".to_string()))
            .then_some(()))
        }
    })
    .await?;

    // Connected follows the broker, with PropertiesChanged.
    let mut world = world;
    world.broker.stop().await?;
    let line = wait_line(&mut monitor, "Connected false", |l| {
        l.contains("PropertiesChanged") && l.contains("Connected")
    })
    .await?;
    assert!(line.contains("<false>"), "{line}");
    world.broker.restart().await?;
    let line = wait_line(&mut monitor, "Connected true", |l| {
        l.contains("PropertiesChanged") && l.contains("Connected")
    })
    .await?;
    assert!(line.contains("<true>"), "{line}");
    drop(bob_d);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesd_serves_without_a_session_bus_and_says_so_once() -> Result<()> {
    let world = World::start().await?;
    let bob = Identity::generate("bob")?;
    bob.register(&world.keyserver).await?;
    let missing = tempfile::tempdir()?;
    let address = format!("unix:path={}", missing.path().join("no-bus").display());
    let bob_d = BusNesd::start(
        &bob,
        &world.broker,
        &world.keyserver,
        &[("DBUS_SESSION_BUS_ADDRESS", &address)],
    )
    .await?;
    let home = tempfile::tempdir()?;
    let out = nes_e2e::frontends::run_nes(&bob_d.socket(), home.path(), &["status"], b"")
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("bob"));
    let log = bob_d.log();
    assert_eq!(
        log.matches("no D-Bus session bus").count(),
        1,
        "said once:\n{log}"
    );
    Ok(())
}
