//! nesd's D-Bus API (`org.nes.Messenger1`) on a real, private session bus: every method
//! and property through `busctl --user` and `gdbus`, the `MessageReceived` and
//! `PropertiesChanged` signals through `gdbus monitor` and the `examples/dbus-monitor.sh`
//! one-liner; and nesd without any session bus.

use anyhow::{bail, Result};
use nes_e2e::frontends::{examples_dir, run, Lines, SessionBus};
use nes_e2e::{eventually, history, send, Identity, Nesd, World, TIMEOUT};

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

/// nesd for `id` on `bus`, once it owns [`DEST`] there.
async fn nesd_on(bus: &SessionBus, world: &World, id: &Identity) -> Result<Nesd> {
    let nesd = Nesd::builder(id, &world.broker, &world.keyserver)
        .session_bus(bus)
        .start()
        .await?;
    bus.wait_for_name(DEST).await?;
    Ok(nesd)
}

/// `gdbus call` of nesd's `method` with `args`: (exit code, stdout, stderr).
async fn gdbus_call(
    bus: &SessionBus,
    method: &str,
    args: &[&str],
) -> Result<(i32, String, String)> {
    let mut all = vec![
        "call",
        "--session",
        "--dest",
        DEST,
        "--object-path",
        PATH,
        "--method",
        method,
    ];
    all.extend(args);
    gdbus(bus, &all).await
}

/// `gdbus introspect` of `object` on nesd's name: (exit code, stdout, stderr).
async fn gdbus_introspect(bus: &SessionBus, object: &str) -> Result<(i32, String, String)> {
    gdbus(
        bus,
        &[
            "introspect",
            "--session",
            "--dest",
            DEST,
            "--object-path",
            object,
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_property_and_signal_on_a_real_session_bus() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let bob = Identity::generate("bob")?;
    bob.register(&world.keyserver).await?;
    let bus = SessionBus::start().await?;
    let bob_d = nesd_on(&bus, &world, &bob).await?;

    // Watchers first: gdbus monitor (all signals of the object) and the example one-liner.
    let mut monitor = bus.monitor(DEST, PATH).await?;
    let mut example =
        Lines::spawn(bus.command(&examples_dir().join("dbus-monitor.sh").display().to_string()))?;
    // dbus-monitor shows its own NameAcquired first: then it is listening.
    example
        .next_matching("dbus-monitor to start", |l| {
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
    let line = monitor
        .next_matching("MessageReceived", |l| l.contains("MessageReceived"))
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
    let line = monitor
        .next_matching("Unread changed", |l| {
            l.contains("PropertiesChanged") && l.contains("Unread")
        })
        .await?;
    assert!(line.contains("<uint64 1>"), "{line}");
    example
        .next_matching("the example to print the text", |l| {
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
    let line = monitor
        .next_matching("Unread back to 0", |l| {
            l.contains("PropertiesChanged") && l.contains("Unread")
        })
        .await?;
    assert!(line.contains("<uint64 0>"), "{line}");
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "Unread"]).await?,
        "t 0"
    );

    // The same through gdbus, which reads the introspection to type the arguments.
    let (code, out, err) =
        gdbus_call(&bus, "org.nes.Messenger1.Send", &["alice", "hi from gdbus"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("('") && out.ends_with("==',)"), "{out}");
    let (code, out, err) = gdbus_call(&bus, "org.nes.Messenger1.History", &["alice", "0"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("'hi from busctl', 'outgoing'") && out.contains("'hi from gdbus', 'outgoing'"),
        "{out}"
    );
    let (code, out, err) =
        gdbus_call(&bus, "org.freedesktop.DBus.Properties.GetAll", &[DEST]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("'User': <'bob'>") && out.contains("'Connected': <true>"),
        "{out}"
    );
    let (code, out, _) = gdbus_introspect(&bus, PATH).await?;
    assert_eq!(code, 0);
    assert!(
        out.contains("MessageReceived(s id,") || out.contains("MessageReceived("),
        "{out}"
    );

    // Errors carry the service's class and message.
    let (code, _, err) = gdbus_call(&bus, "org.nes.Messenger1.Send", &["zed-nobody", "x"]).await?;
    assert_ne!(code, 0);
    assert!(
        err.contains("org.nes.Messenger1.Error.NotFound") && err.contains("zed-nobody"),
        "{err}"
    );
    let (code, _, err) = gdbus_call(&bus, "org.nes.Messenger1.Send", &["alice", ""]).await?;
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
    let line = monitor
        .next_matching("Connected false", |l| {
            l.contains("PropertiesChanged") && l.contains("Connected")
        })
        .await?;
    assert!(line.contains("<false>"), "{line}");
    world.broker.restart().await?;
    let line = monitor
        .next_matching("Connected true", |l| {
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
    let bob_d = Nesd::builder(&bob, &world.broker, &world.keyserver)
        .env("DBUS_SESSION_BUS_ADDRESS", &address)
        .start()
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

/// Every member the hand-written introspection XML declared before nesd used zbus's
/// object server (copied from it), and those added since (receipts, presence, files), as
/// `busctl introspect` shows them: (interface, member, kind, signature, result for a
/// method, flags).
const DECLARED: &[(&str, &str, &str, &str, &str, &str)] = &[
    (DEST, ".Send", "method", "ss", "s", "-"),
    (DEST, ".ListConversations", "method", "-", "a(sttxs)", "-"),
    (DEST, ".History", "method", "su", "a(sssxsss)", "-"),
    (DEST, ".MarkRead", "method", "s", "t", "-"),
    (DEST, ".MessageReceived", "signal", "ssxs", "-", "-"),
    (DEST, ".MessageStateChanged", "signal", "sss", "-", "-"),
    (DEST, ".SetPresence", "method", "ss", "s", "-"),
    (DEST, ".GetPresence", "method", "s", "ssx", "-"),
    (DEST, ".PresenceChanged", "signal", "sss", "-", "-"),
    (DEST, ".SendFile", "method", "ss", "s", "-"),
    (DEST, ".FileReceived", "signal", "sssts", "-", "-"),
    (DEST, ".User", "property", "s", "", "const"),
    (DEST, ".Connected", "property", "b", "", "emits-change"),
    (DEST, ".Unread", "property", "t", "", "emits-change"),
    (
        "org.freedesktop.DBus.Properties",
        ".Get",
        "method",
        "ss",
        "v",
        "-",
    ),
    (
        "org.freedesktop.DBus.Properties",
        ".GetAll",
        "method",
        "s",
        "a{sv}",
        "-",
    ),
    (
        "org.freedesktop.DBus.Properties",
        ".Set",
        "method",
        "ssv",
        "-",
        "-",
    ),
    (
        "org.freedesktop.DBus.Properties",
        ".PropertiesChanged",
        "signal",
        "sa{sv}as",
        "-",
        "-",
    ),
    (
        "org.freedesktop.DBus.Introspectable",
        ".Introspect",
        "method",
        "-",
        "s",
        "-",
    ),
    (
        "org.freedesktop.DBus.Peer",
        ".Ping",
        "method",
        "-",
        "-",
        "-",
    ),
    (
        "org.freedesktop.DBus.Peer",
        ".GetMachineId",
        "method",
        "-",
        "s",
        "-",
    ),
];

/// The same XML's argument names and directions, as `gdbus introspect` prints them
/// (whitespace collapsed).
const DECLARED_ARGS: &[&str] = &[
    "Send(in s recipient, in s text, out s id);",
    "ListConversations(out a(sttxs) conversations);",
    "History(in s peer, in u limit, out a(sssxsss) messages);",
    "MarkRead(in s peer, out t marked);",
    "MessageReceived(s id, s from, x timestamp, s text);",
    "MessageStateChanged(s id, s peer, s state);",
    "SetPresence(in s status, in s note, out s status);",
    "GetPresence(in s user, out s status, out s note, out x last_seen);",
    "PresenceChanged(s user, s status, s note);",
    "SendFile(in s recipient, in s path, out s id);",
    "FileReceived(s id, s from, s name, t size, s path);",
    "@org.freedesktop.DBus.Property.EmitsChangedSignal(\"const\") readonly s User = 'bob';",
    "readonly b Connected = true;",
    "readonly t Unread = 0;",
];

/// A world with bob's nesd on a private session bus.
async fn bob_on_a_bus() -> Result<(World, SessionBus, Nesd)> {
    let world = World::start().await?;
    let bob = Identity::generate("bob")?;
    bob.register(&world.keyserver).await?;
    let bus = SessionBus::start().await?;
    let bob_d = nesd_on(&bus, &world, &bob).await?;
    Ok((world, bus, bob_d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_names_every_member_the_hand_written_xml_declared() -> Result<()> {
    let (_world, bus, _bob_d) = bob_on_a_bus().await?;

    // busctl: every row, by interface, with its signature, result and flags.
    let table = busctl(&bus, &["introspect", DEST, PATH]).await?;
    let mut rows = Vec::new();
    let mut interface = String::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        if fields[1] == "interface" {
            interface = fields[0].to_string();
            continue;
        }
        let result = if fields[1] == "property" {
            String::new() // the current value, checked through gdbus below
        } else {
            fields[3..fields.len() - 1].join(" ")
        };
        rows.push((
            interface.clone(),
            fields[0].to_string(),
            fields[1].to_string(),
            fields[2].to_string(),
            result,
            fields[fields.len() - 1].to_string(),
        ));
    }
    for &(iface, member, kind, signature, result, flags) in DECLARED {
        let want = (
            iface.to_string(),
            member.to_string(),
            kind.to_string(),
            signature.to_string(),
            result.to_string(),
            flags.to_string(),
        );
        assert!(rows.contains(&want), "{want:?} in:\n{table}");
    }
    // Nothing more on our interface than the XML declared.
    let ours: Vec<_> = rows.iter().filter(|r| r.0 == DEST).collect();
    assert_eq!(
        ours.len(),
        DECLARED.iter().filter(|d| d.0 == DEST).count(),
        "{table}"
    );

    // gdbus: argument names and directions, the property annotation.
    let (code, out, err) = gdbus_introspect(&bus, PATH).await?;
    assert_eq!(code, 0, "{err}");
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in DECLARED_ARGS {
        assert!(flat.contains(needle), "{needle} in:\n{out}");
    }

    // The nodes leading to the object, so `busctl tree` finds it.
    let (code, out, err) = gdbus_introspect(&bus, "/org/nes").await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node Messenger1"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_calls_answer_named_errors() -> Result<()> {
    let (_world, bus, _bob_d) = bob_on_a_bus().await?;

    // busctl prints the message (it shows no error names) and fails.
    let mut cmd = bus.command("busctl");
    cmd.args([
        "--user",
        "call",
        DEST,
        PATH,
        DEST,
        "Send",
        "ss",
        "zed-nobody",
        "x",
    ]);
    let out = run(cmd, b"").await?;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("zed-nobody"), "{}", out.stderr);

    // dbus-send names the error.
    let dbus_send = |args: &[&str]| {
        let mut cmd = bus.command("dbus-send");
        cmd.args([
            "--session",
            "--print-reply",
            &format!("--dest={DEST}"),
            PATH,
        ])
        .args(args);
        cmd
    };
    for (args, name) in [
        (
            &["org.nes.Messenger1.Send", "string:zed-nobody", "string:x"][..],
            "org.nes.Messenger1.Error.NotFound",
        ),
        (
            &["org.nes.Messenger1.Send", "string:Not A Name!", "string:x"][..],
            "org.nes.Messenger1.Error.InvalidArgument",
        ),
        (
            &[
                "org.nes.Messenger1.History",
                "string:zed-nobody",
                "uint32:1",
            ][..],
            "",
        ),
        (
            &["org.nes.Messenger1.Send", "string:only-one-argument"][..],
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            &["org.nes.Messenger1.Nope"][..],
            "org.freedesktop.DBus.Error.UnknownMethod",
        ),
        (
            &[
                "org.freedesktop.DBus.Properties.Set",
                "string:org.nes.Messenger1",
                "string:Unread",
                "variant:uint64:5",
            ][..],
            // zbus's object server answers a Set of a property without a setter with
            // UnknownProperty (0.1.0's hand-written code said PropertyReadOnly); the
            // property stays `access="read"` in the introspection either way.
            "org.freedesktop.DBus.Error.UnknownProperty",
        ),
    ] {
        let out = run(dbus_send(args), b"").await?;
        if name.is_empty() {
            // History of an unknown peer is an empty list, not an error.
            assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
            continue;
        }
        assert_ne!(out.code, 0, "{args:?}: {}", out.stdout);
        assert!(
            out.stderr.contains(&format!("Error {name}")),
            "{args:?}: {name} in {}",
            out.stderr
        );
    }
    Ok(())
}

/// The `busctl`, `gdbus` and `dbus-monitor` lines of a README's sh blocks, continuation
/// lines joined, in order.
fn readme_lines(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )?;
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        if ["busctl ", "gdbus ", "dbus-monitor "]
            .iter()
            .any(|p| full.starts_with(p))
            && full.contains(DEST)
        {
            lines.push(full);
        }
    }
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_lines_work_word_for_word_and_a_clean_stop_releases_the_name() -> Result<()> {
    // The README lines talk to bob: alice's nesd serves the bus, bob is a peer over gRPC.
    let world = World::start().await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let alice = Identity::generate("alice")?;
    alice.register(&world.keyserver).await?;
    let bus = SessionBus::start().await?;
    let mut alice_d = nesd_on(&bus, &world, &alice).await?;

    let mut lines = readme_lines("README.md")?;
    for line in readme_lines("frontends/README.md")? {
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    // README.md's four lines and frontends/README.md's ten (four of them the same).
    assert_eq!(lines.len(), 10, "the README lines: {lines:#?}");
    let sh = |line: &str| {
        let mut cmd = bus.command("sh");
        cmd.arg("-c").arg(format!("exec {line}"));
        cmd
    };

    // The monitors first (they run until stopped).
    let mut monitors = Vec::new();
    for line in lines
        .iter()
        .filter(|l| l.contains(" monitor") || l.starts_with("dbus-monitor"))
    {
        let mut monitor = Lines::spawn(sh(line))?;
        let ready = if line.starts_with("gdbus") {
            "Monitoring signals"
        } else {
            "NameAcquired"
        };
        monitor.next_matching(line, |l| l.contains(ready)).await?;
        monitors.push((line.clone(), monitor));
    }
    assert_eq!(monitors.len(), 2, "{lines:#?}");

    // bob writes: every monitor sees MessageReceived; the gdbus one PropertiesChanged too.
    let mut bob_c = bob_d.client().await?;
    send(&mut bob_c, "alice", "hello alice").await?;
    for (line, monitor) in &mut monitors {
        let got = monitor
            .next_matching(line, |l| l.contains("MessageReceived"))
            .await?;
        if line.starts_with("gdbus") {
            assert!(
                got.contains("'bob'") && got.contains("'hello alice'"),
                "{got}"
            );
            let got = monitor
                .next_matching(line, |l| l.contains("PropertiesChanged"))
                .await?;
            assert!(
                got.contains("('org.nes.Messenger1', {'Unread': <uint64 1>}, @as [])"),
                "{got}"
            );
        }
    }

    // Every other line, in the READMEs' order, exits 0 with the expected answer.
    for line in lines
        .iter()
        .filter(|l| !monitors.iter().any(|(m, _)| m == *l))
    {
        let out = run(sh(line), b"").await?;
        assert_eq!(out.code, 0, "{line}: {}", out.stderr);
        let stdout = out.stdout.trim();
        let ok = if line.contains(" Send ") {
            stdout.starts_with("s \"") && stdout.ends_with("==\"")
        } else if line.contains(".Send ") {
            stdout.starts_with("('") && stdout.ends_with("==',)")
        } else if line.contains(" ListConversations") {
            stdout.starts_with("a(sttxs) 1 \"bob\"")
        } else if line.contains(" History su bob 20") {
            stdout.starts_with("a(sssxsss) ") && stdout.contains("\"hello alice\"")
        } else if line.contains(".History bob 20") {
            stdout.contains("'hello alice'")
        } else if line.contains(" MarkRead s bob") {
            stdout == "t 1" || stdout == "t 0"
        } else if line.contains(" get-property ") {
            stdout.starts_with("s \"alice\"\nb true\nt ")
        } else if line.contains(" introspect ") {
            stdout.contains(".MessageReceived")
        } else {
            false
        };
        assert!(ok, "{line}:\n{stdout}");
    }
    // MarkRead's Unread change reached the gdbus monitor.
    let (_, gdbus_monitor) = monitors
        .iter_mut()
        .find(|(l, _)| l.starts_with("gdbus"))
        .ok_or_else(|| anyhow::anyhow!("no gdbus monitor line"))?;
    let got = gdbus_monitor
        .next_matching("Unread back to 0", |l| {
            l.contains("PropertiesChanged") && l.contains("Unread")
        })
        .await?;
    assert!(got.contains("<uint64 0>"), "{got}");
    // bob got what the lines sent.
    eventually("bob received the README sends", TIMEOUT, || {
        let mut c = bob_c.clone();
        async move {
            let texts: Vec<String> = history(&mut c, "alice")
                .await?
                .into_iter()
                .map(|m| m.text)
                .collect();
            Ok((texts.contains(&"hello from D-Bus".to_string())
                && texts.contains(&"hello from gdbus".to_string()))
            .then_some(()))
        }
    })
    .await?;

    // A clean stop: exit 0, nesd itself gave the name back, and it is gone from the bus.
    alice_d.stop().await?;
    assert!(
        alice_d.log().contains("released the D-Bus name"),
        "{}",
        alice_d.log()
    );
    assert!(!bus.has_owner(DEST).await?, "the name is still owned");
    // So the next nesd gets it at once.
    let alice_again = nesd_on(&bus, &world, &alice).await?;
    assert_eq!(
        busctl(&bus, &["get-property", DEST, PATH, DEST, "User"]).await?,
        "s \"alice\""
    );
    drop(alice_again);
    Ok(())
}
