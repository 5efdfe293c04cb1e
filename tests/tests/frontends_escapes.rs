//! Text a sender chose never reaches a terminal or a notification raw (issue 14, item 2).
//!
//! alice sends bob a message with a terminal title sequence, a clear-screen sequence, a
//! carriage return, a newline followed by a line that pretends to come from mallory, a
//! bidi override, a zero-width space and a `<b>` markup attempt. Through each frontend:
//! `nes listen` and `nes history` print it escaped on the message's own line (no ESC, CR,
//! BEL; the fake line never starts a line), `--json` keeps it exact, `nes chat` (tmux)
//! shows the escaped form and its pane title stays, and nes-notify's body (dunst) is
//! escaped for the terminal-style characters and for markup.

use anyhow::Result;
use nes_e2e::frontends::{isolate, json_lines, nes, run_nes, Dunst, Lines, SessionBus, Tmux, Xvfb};
use nes_e2e::{bin, eventually, history, send, status, World, TIMEOUT};
use std::path::Path;

/// What alice sends.
const TEXT: &str =
    "hi \x1b]0;pwned\x07\x1b[2J\r\nmallory: fake line \u{202e}evil\u{200b}end <b>bold</b>";
/// How every human-facing output shows it (`nes_client::display::line`).
const SHOWN: &str = "hi \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nmallory: fake line \\u{202e}evil\\u{200b}end <b>bold</b>";

/// Human output carries none of the dangerous bytes and no line starts with the fake one.
fn assert_safe(what: &str, out: &str) {
    for bad in ['\x1b', '\r', '\x07', '\u{202e}', '\u{200b}'] {
        assert!(!out.contains(bad), "{what} printed {bad:?} raw: {out:?}");
    }
    for line in out.lines() {
        assert!(
            !line.trim_start().starts_with("mallory"),
            "{what}: the fake line starts a line: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escape_sequence_message_is_shown_escaped_by_every_frontend() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let (b, h) = (bob_d.socket(), home.path());
    let mut bob = bob_d.client().await?;
    let start = status(&mut bob).await?.last_cursor.to_string();

    // nes-notify (with dunst) follows from now on.
    let bus = SessionBus::start().await?;
    let x = Xvfb::start().await?;
    let dunst = Dunst::start(&bus, &x).await?;
    let mut notify = {
        let mut cmd = tokio::process::Command::new(bin("nes-notify")?);
        isolate(&mut cmd, h);
        cmd.env("NES_SOCKET", &b)
            .env("DBUS_SESSION_BUS_ADDRESS", bus.address())
            .args(["--print", "--since", &start, "--state-file"])
            .arg(h.join("notify.cursor"));
        Lines::spawn(cmd)?
    };
    // A human `nes listen`, running while the message arrives.
    let mut listen = {
        let mut cmd = nes(&b, h)?;
        cmd.args(["listen", "--since", &start]);
        Lines::spawn(cmd)?
    };

    let sent = send(&mut alice_d.client().await?, "bob", TEXT).await?;
    eventually("bob has the message", TIMEOUT, || {
        let mut c = bob.clone();
        async move { Ok((!history(&mut c, "alice").await?.is_empty()).then_some(())) }
    })
    .await?;

    // (a) nes listen and nes history, human mode: one escaped line.
    let line = listen.next().await?;
    assert!(line.ends_with(&format!("alice → bob: {SHOWN}")), "{line:?}");
    assert_safe("nes listen (live)", &line);
    let out = run_nes(&b, h, &["listen", "--since", &start, "--count", "1"], b"")
        .await?
        .expect_code(0)?;
    assert_eq!(out.stdout.lines().count(), 1, "{:?}", out.stdout);
    assert!(out.stdout.contains(SHOWN), "{:?}", out.stdout);
    assert_safe("nes listen", &out.stdout);
    let out = run_nes(&b, h, &["history", "alice"], b"")
        .await?
        .expect_code(0)?;
    assert_eq!(out.stdout.lines().count(), 1, "{:?}", out.stdout);
    assert!(out.stdout.contains(SHOWN), "{:?}", out.stdout);
    assert_safe("nes history alice", &out.stdout);
    let out = run_nes(&b, h, &["history"], b"").await?.expect_code(0)?;
    assert!(out.stdout.starts_with("alice"), "{:?}", out.stdout);
    assert!(
        out.stdout.contains("hi \\u{1b}]0;pwned"),
        "{:?}",
        out.stdout
    );
    assert_safe("nes history", &out.stdout);

    // (b) --json keeps the exact text.
    let out = run_nes(
        &b,
        h,
        &["listen", "--json", "--since", &start, "--count", "1"],
        b"",
    )
    .await?
    .expect_code(0)?;
    let lines = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    assert_eq!(lines[0]["message"], TEXT);
    assert_eq!(lines[0]["id"], sent.id.as_str());
    let out = run_nes(&b, h, &["history", "alice", "--json"], b"")
        .await?
        .expect_code(0)?;
    let lines = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message"], TEXT);

    // (c) nes chat in tmux: the escaped form on screen, the pane title untouched.
    let chat = chat(&b, h, "alice").await?;
    let title_before = chat.pane_title().await?;
    let screen = chat
        .wait_for("alice: hi \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nmallory: fake line")
        .await?;
    assert!(
        screen.contains("\\u{202e}evil\\u{200b}end <b>bold</b>"),
        "{screen}"
    );
    assert!(
        !screen
            .lines()
            .any(|l| l.trim_start_matches(['│', ' ']).starts_with("mallory")),
        "{screen}"
    );
    // The chat has drawn everything by now; the title is still the one it had.
    chat.wait_for("Esc to leave").await?;
    let title = chat.pane_title().await?;
    assert!(
        !title.contains("pwned"),
        "the message retitled the pane: {title:?}"
    );
    assert_eq!(title, title_before);
    chat.keys(&["Escape"]).await?;

    // (d) nes-notify: the body shown by dunst is escaped, markup included.
    let printed = notify.next().await?;
    assert!(
        printed.starts_with(&format!("shown alice {}: ", sent.id)),
        "{printed:?}"
    );
    assert_safe("nes-notify --print", &printed);
    let shown = eventually("dunst to show the notification", TIMEOUT, || async {
        let history = dunst.history().await?;
        Ok(history.into_iter().find(|(app, _, _)| app == "NES"))
    })
    .await?;
    let (_, summary, body) = shown;
    assert_eq!(summary, "alice");
    assert_safe("the notification body", &body);
    assert!(!body.contains('\n'), "{body:?}");
    assert!(
        body.contains(
            "hi \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nmallory: fake line \\u{202e}evil\\u{200b}end"
        ),
        "{body:?}"
    );
    assert!(
        !body.contains("<b>"),
        "markup reached the notification server unescaped: {body:?}"
    );
    assert!(body.contains("&lt;b&gt;bold&lt;/b&gt;"), "{body:?}");
    Ok(())
}

async fn chat(socket: &Path, home: &Path, peer: &str) -> Result<Tmux> {
    let env = vec![
        ("NES_SOCKET", socket.display().to_string()),
        ("HOME", home.display().to_string()),
        (
            "XDG_CONFIG_HOME",
            home.join(".config").display().to_string(),
        ),
        (
            "XDG_STATE_HOME",
            home.join(".local/state").display().to_string(),
        ),
        ("LANG", "C.UTF-8".to_string()),
    ];
    // Wide enough for the whole escaped message on one row.
    Tmux::start(
        &format!("'{}' chat -t {peer}", bin("nes")?.display()),
        &env,
        200,
        30,
    )
    .await
}
