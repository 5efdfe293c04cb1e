//! Files end to end (issue 13), through a real mosquitto and the real key server, seen
//! through `nes --json`, a real session bus (`gdbus monitor`) and a real terminal (tmux
//! running `nes chat`).
//!
//! - A 20 MiB file arrives whole: the hash matches, it is stored once (0600, named by
//!   id), it is one message in history and one line in `listen --json`, `FileReceived`
//!   on D-Bus, a line in `nes chat`; `/file` in `nes chat` sends one too.
//! - The same with a broker restart, a `kill -9` of bob's nesd and one of alice's
//!   mid-transfer: it resumes (the chunks sent stay far below twice the file) and is
//!   stored once.
//! - A file over bob's `max_file_size` is refused with nothing kept; one cancelled by its
//!   sender while the receiver is down ends cancelled on both sides with nothing kept; a
//!   legacy contact cannot be sent a file (exit 1, nothing sent).
//! - nes-notify (dunst) says "alice sent report.pdf (1.2 MB)" once it is complete;
//!   `nes send --file --wait` draws its bar on a terminal (tmux) and nothing on a pipe.

use anyhow::{ensure, Context, Result};
use nes_e2e::frontends::{json_lines, nes, nes_chat, run_nes, Lines, SessionBus};
use nes_e2e::*;
use nes_proto::rpc::{self, Direction, FileState, MessageState};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const DEST: &str = "org.nes.Messenger1";
const PATH: &str = "/org/nes/Messenger1";
const MIB: usize = 1 << 20;
/// nesd's `files::WINDOW_CHUNKS`: chunks out unreported at most, so lost in one fault.
const WINDOW_CHUNKS: u64 = 32;

/// The regular files directly under `dir` (not the `partial/` and `upload/` folders).
fn files_in(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let e = e?;
        if e.file_type()?.is_file() {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// Waits until bob has at least `bytes` of the file.
async fn wait_transferred(client: &Client, id: &str, bytes: u64) -> Result<()> {
    eventually(
        &format!("{bytes} bytes of {id}"),
        Duration::from_secs(120),
        || {
            let (mut c, id) = (client.clone(), id.to_owned());
            async move {
                let m = get_file(&mut c, &id).await?;
                Ok((m.file.map(|f| f.transferred).unwrap_or(0) >= bytes).then_some(()))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_file_arrives_whole_once_in_json_dbus_and_chat() -> Result<()> {
    let w = World::start().await?;
    let bus = SessionBus::start().await?;
    let (_alice_id, alice, a) = w.connected_user("alice").await?;
    let bob_id = Identity::generate("bob")?;
    bob_id.register(&w.keyserver).await?;
    let bob = Nesd::builder(&bob_id, &w.broker, &w.keyserver)
        .session_bus(&bus)
        .start()
        .await?;
    bus.wait_for_name(DEST).await?;
    let b = bob.client().await?;
    wait_connected(&b).await?;
    wait_prekey_published(&a, None).await?;
    wait_prekey_published(&b, None).await?;
    let dir = tempfile::tempdir()?;
    let (home, bob_home) = (tempfile::tempdir()?, tempfile::tempdir()?);

    let mut monitor = bus.monitor(DEST, PATH).await?;
    let since = status(&mut b.clone()).await?.last_log_cursor;
    let mut listen = {
        let mut cmd = nes(&bob.socket(), bob_home.path())?;
        cmd.args(["listen", "--json", "--since", &since]);
        Lines::spawn(cmd)?
    };
    let bob_chat = nes_chat(&bob.socket(), bob_home.path(), "alice").await?;
    bob_chat.wait_for("alice").await?;

    // alice: `nes send bob --file big.bin --json`.
    let (path, sha) = random_file(dir.path(), "big.bin", 20 * MIB)?;
    let out = run_nes(
        &alice.socket(),
        home.path(),
        &[
            "send",
            "bob",
            "--file",
            &path.display().to_string(),
            "--json",
        ],
        b"",
    )
    .await?
    .expect_code(0)?;
    let sent = json_lines(&out.stdout.lines().map(str::to_owned).collect::<Vec<_>>())?;
    ensure!(sent.len() == 1, "one line per file: {}", out.stdout);
    ensure!(
        out.stderr.is_empty(),
        "no progress bar off a terminal: {}",
        out.stderr
    );
    let id = sent[0]["id"].as_str().context("an id")?.to_owned();
    ensure!(sent[0]["file"]["name"] == "big.bin", "{}", out.stdout);
    ensure!(sent[0]["file"]["sha256"] == sha.as_str(), "{}", out.stdout);

    let done = wait_file(&b, &id, FileState::Complete)
        .await
        .with_context(|| format!("{}\n{}", alice.log_tail(20), bob.log_tail(20)))?;
    let f = done.file.context("a file")?;
    ensure!(f.size == 20 * MIB as u64 && f.sha256 == sha, "{f:?}");
    let stored = Path::new(&f.path);
    ensure!(sha256_file(stored)? == sha, "bob's copy matches the hash");
    let mode = std::fs::metadata(stored)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "stored 0{mode:o}");
    let hex_id = hex::encode(nes_proto::b64::decode(&id).context("a base64 id")?);
    ensure!(
        stored.file_name() == Some(hex_id.as_ref()),
        "named by id: {f:?}"
    );
    let files_dir = bob_id.data_dir().join("files");
    ensure!(
        files_in(&files_dir)? == [stored.to_path_buf()],
        "stored once"
    );
    ensure!(
        files_in(&files_dir.join("partial"))?.is_empty(),
        "no partial left"
    );

    // alice's message: delivered once bob has it all.
    wait_file(&a, &id, FileState::Complete).await?;
    eventually("alice's file delivered", TIMEOUT, || {
        let mut a = a.clone();
        let id = id.clone();
        async move {
            let m = get_file(&mut a, &id).await?;
            Ok((nes_proto::states::progress(m.state)
                >= nes_proto::states::progress(MessageState::Delivered as i32))
            .then_some(()))
        }
    })
    .await?;

    // One message in bob's history, one line in listen, with the file object.
    let h = history(&mut b.clone(), "alice").await?;
    ensure!(h.len() == 1, "one message: {h:?}");
    ensure!(
        h[0].direction == Direction::Incoming as i32 && h[0].text.is_empty(),
        "{:?}",
        h[0]
    );
    let line = listen
        .next_matching("the file in listen", |l| l.contains(&id))
        .await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(v["file"]["state"] == "complete", "{line}");
    ensure!(v["file"]["path"] == f.path.as_str(), "{line}");
    ensure!(v["file"]["size"] == 20 * MIB as u64, "{line}");

    // D-Bus: FileReceived, once.
    let signal = monitor
        .next_matching("FileReceived", |l| l.contains("FileReceived"))
        .await?;
    ensure!(
        signal.contains(&format!("'{id}'")) && signal.contains("'big.bin'"),
        "{signal}"
    );

    // bob's chat shows it; `nes file save` gives the same bytes.
    bob_chat.wait_for("big.bin").await?;
    let saved = bob_home.path().join("saved.bin");
    run_nes(
        &bob.socket(),
        bob_home.path(),
        &["file", "save", &id, &saved.display().to_string()],
        b"",
    )
    .await?
    .expect_code(0)?;
    ensure!(sha256_file(&saved)? == sha, "the saved copy matches");
    let again = run_nes(
        &bob.socket(),
        bob_home.path(),
        &["file", "save", &id, &saved.display().to_string()],
        b"",
    )
    .await?;
    ensure!(
        again.code == 1,
        "no overwrite without --force: {}",
        again.stderr
    );
    let out = run_nes(&bob.socket(), bob_home.path(), &["files", "--json"], b"")
        .await?
        .expect_code(0)?;
    let listed = json_lines(&out.stdout.lines().map(str::to_owned).collect::<Vec<_>>())?;
    ensure!(
        listed.len() == 1 && listed[0]["file"]["state"] == "complete",
        "{}",
        out.stdout
    );

    // `/file` in alice's chat.
    let (small, small_sha) = random_file(dir.path(), "notes.txt", 3000)?;
    let chat = nes_chat(&alice.socket(), home.path(), "bob").await?;
    chat.wait_for("bob").await?;
    chat.type_text(&format!("/file {}", small.display()))
        .await?;
    chat.keys(&["Enter"]).await?;
    let line = listen
        .next_matching("the chat's file in listen", |l| l.contains("notes.txt"))
        .await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(v["file"]["sha256"] == small_sha.as_str(), "{line}");
    bob_chat.wait_for("notes.txt").await?;

    // D-Bus SendFile: bob sends one back; nesd reads it from the path.
    let (back, back_sha) = random_file(dir.path(), "back.bin", 300_000)?;
    let out = bus
        .command("gdbus")
        .args(["call", "--session", "--dest", DEST, "--object-path", PATH])
        .args(["--method", "org.nes.Messenger1.SendFile", "alice"])
        .arg(&back)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = String::from_utf8_lossy(&out.stdout).into_owned();
    let back_id = reply
        .split('\'')
        .nth(1)
        .with_context(|| format!("an id in {reply}"))?
        .to_owned();
    let got = wait_file(&a, &back_id, FileState::Complete).await?;
    ensure!(got.file.map(|f| f.sha256) == Some(back_sha), "{reply}");

    // Nothing shown twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = listen.drain().to_vec();
    let big = lines.iter().filter(|l| l.contains(&id)).count();
    ensure!(big == 1, "the big file once in listen: {lines:?}");
    let signals: Vec<String> = monitor
        .drain()
        .iter()
        .filter(|l| l.contains("FileReceived"))
        .cloned()
        .collect();
    let once = |name: &str| signals.iter().filter(|l| l.contains(name)).count() == 1;
    ensure!(
        signals.len() == 2 && once("'big.bin'") && once("'notes.txt'"),
        "one FileReceived per file: {signals:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_and_kill_9_of_either_daemon_resume_and_store_once() -> Result<()> {
    let mut w = World::start().await?;
    let (_alice_id, mut alice, a) = w.connected_user("alice").await?;
    let (bob_id, mut bob, b) = w.connected_user("bob").await?;
    wait_prekey_published(&a, None).await?;
    wait_prekey_published(&b, None).await?;
    let dir = tempfile::tempdir()?;
    let (path, sha) = random_file(dir.path(), "resume.bin", 20 * MIB)?;
    let chunks = (20 * MIB / nes_proto::files::MAX_CHUNK_BYTES as usize) as u64;

    let sent = send_file(&mut a.clone(), "bob", &path).await?;
    let id = sent.id.clone();
    let logs = |alice: &Nesd, bob: &Nesd| format!("{}\n{}", alice.log_tail(30), bob.log_tail(30));

    // The broker restarts after a few MiB.
    wait_transferred(&b, &id, 3 * MIB as u64)
        .await
        .with_context(|| logs(&alice, &bob))?;
    w.broker.restart().await?;
    // bob's nesd is killed after some more.
    wait_transferred(&b, &id, 8 * MIB as u64)
        .await
        .with_context(|| logs(&alice, &bob))?;
    bob.kill9()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.start_again().await?;
    let b = bob.client().await?;
    // alice's, after some more.
    wait_transferred(&b, &id, 13 * MIB as u64)
        .await
        .with_context(|| logs(&alice, &bob))?;
    let sent_before = status(&mut a.clone()).await?.file_chunks_sent;
    alice.kill9()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.start_again().await?;
    let a = alice.client().await?;

    let done = wait_file(&b, &id, FileState::Complete)
        .await
        .with_context(|| logs(&alice, &bob))?;
    let f = done.file.context("a file")?;
    ensure!(sha256_file(Path::new(&f.path))? == sha, "the hash matches");
    wait_file(&a, &id, FileState::Complete)
        .await
        .with_context(|| logs(&alice, &bob))?;
    let sent_after = status(&mut a.clone()).await?.file_chunks_sent;
    let total = sent_before + sent_after;
    // Starting over after the last fault alone would be > chunks + 13 MiB of chunks.
    ensure!(
        total <= chunks + 3 * WINDOW_CHUNKS,
        "{total} chunks sent for a file of {chunks}: it resumed rather than restarted"
    );
    eprintln!("resume: {total} chunks sent for {chunks}");

    let files_dir = bob_id.data_dir().join("files");
    ensure!(files_in(&files_dir)?.len() == 1, "stored once");
    ensure!(files_in(&files_dir.join("partial"))?.is_empty());
    let h = history(&mut b.clone(), "alice").await?;
    ensure!(h.len() == 1, "one message: {h:?}");
    let listed = b
        .clone()
        .files(rpc::FilesRequest::default())
        .await?
        .into_inner()
        .messages;
    ensure!(listed.len() == 1, "{listed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_and_to_legacy_contacts_files_are_refused() -> Result<()> {
    let w = World::start().await?;
    let (alice_id, alice, a) = w.connected_user("alice").await?;
    let (bob_id, bob) = w.user_with("bob", ["--max-file-size", "1MiB"]).await?;
    let b = bob.client().await?;
    wait_connected(&b).await?;
    let (carol_id, mut carol, c) = w.connected_user("carol").await?;
    let dir = tempfile::tempdir()?;
    let home = tempfile::tempdir()?;

    // Over bob's limit: refused by bob, nothing kept there.
    let (big, _) = random_file(dir.path(), "big.bin", 2 * MIB)?;
    let sent = send_file(&mut a.clone(), "bob", &big).await?;
    let failed = wait_file(&a, &sent.id, FileState::Failed)
        .await
        .with_context(|| bob.log_tail(20))?;
    let why = failed.file.map(|f| f.error).unwrap_or_default();
    ensure!(why.contains("refused by bob"), "{why}");
    let files_dir = bob_id.data_dir().join("files");
    ensure!(files_in(&files_dir)?.is_empty(), "nothing kept");
    ensure!(files_in(&files_dir.join("partial"))?.is_empty());
    ensure!(history(&mut b.clone(), "alice").await?.is_empty());
    let refused = status(&mut b.clone()).await?.refused;
    ensure!(refused.get("file_too_large") == Some(&1), "{refused:?}");
    // Within it: fine.
    let (ok, ok_sha) = random_file(dir.path(), "ok.bin", 512 * 1024)?;
    let sent = send_file(&mut a.clone(), "bob", &ok).await?;
    let done = wait_file(&b, &sent.id, FileState::Complete).await?;
    ensure!(done.file.map(|f| f.sha256) == Some(ok_sha));

    // Cancelled by alice while carol's nesd is down: both sides end cancelled, carol
    // keeps nothing.
    let (mid, _) = random_file(dir.path(), "mid.bin", 12 * MIB)?;
    let sent = send_file(&mut a.clone(), "carol", &mid).await?;
    wait_transferred(&c, &sent.id, MIB as u64).await?;
    carol.kill9()?;
    let cancelled = a
        .clone()
        .cancel_file(rpc::GetFileRequest {
            id: sent.id.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        cancelled.file.as_ref().map(|f| f.state) == Some(FileState::Cancelled as i32),
        "{cancelled:?}"
    );
    carol.start_again().await?;
    let c = carol.client().await?;
    wait_file(&c, &sent.id, FileState::Cancelled)
        .await
        .with_context(|| carol.log_tail(20))?;
    let carol_files = carol_id.data_dir().join("files");
    ensure!(files_in(&carol_files)?.is_empty(), "carol keeps nothing");
    eventually("carol's partial file gone", TIMEOUT, || {
        let dir = carol_files.join("partial");
        async move { Ok(files_in(&dir)?.is_empty().then_some(())) }
    })
    .await?;

    // A legacy contact: exit 1, nothing sent, nothing kept.
    let mut ac = a.clone();
    ac.set_contact_legacy(rpc::SetContactLegacyRequest {
        username: "carol".into(),
        legacy: true,
    })
    .await?;
    let queued_before = status(&mut a.clone()).await?.queued;
    let carol_before = history(&mut a.clone(), "carol").await?.len();
    let out = run_nes(
        &alice.socket(),
        home.path(),
        &["send", "carol", "--file", &ok.display().to_string()],
        b"",
    )
    .await?;
    ensure!(out.code == 1, "exit 1 for a legacy contact: {out:?}");
    ensure!(out.stderr.contains("legacy"), "{}", out.stderr);
    ensure!(history(&mut a.clone(), "carol").await?.len() == carol_before);
    ensure!(status(&mut a.clone()).await?.queued == queued_before);
    let alice_files = alice_id.data_dir().join("files");
    ensure!(files_in(&alice_files.join("upload"))?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nes_notify_says_who_sent_which_file_once_it_is_complete() -> Result<()> {
    use nes_e2e::frontends::{isolate, Dunst, Xvfb};
    let w = World::start().await?;
    let (_alice_id, _alice, a) = w.connected_user("alice").await?;
    let (_bob_id, bob, b) = w.connected_user("bob").await?;
    let bus = SessionBus::start().await?;
    let x = Xvfb::start().await?;
    let dunst = Dunst::start(&bus, &x).await?;
    let home = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(bin("nes-notify")?);
    isolate(&mut cmd, home.path());
    cmd.env("NES_SOCKET", bob.socket())
        .env("DBUS_SESSION_BUS_ADDRESS", bus.address())
        .args(["--print", "--state-file"])
        .arg(home.path().join("notify.cursor"));
    let mut notify = Lines::spawn(cmd)?;
    eventually("nes-notify to subscribe", TIMEOUT, || async {
        Ok(notify
            .stderr()
            .contains("starting with new messages")
            .then_some(()))
    })
    .await?;

    let dir = tempfile::tempdir()?;
    let (path, _) = random_file(dir.path(), "report.pdf", 1_200_000)?;
    let sent = send_file(&mut a.clone(), "bob", &path).await?;
    wait_file(&b, &sent.id, FileState::Complete).await?;
    let line = notify
        .next_matching("the file's notification", |l| l.contains(&sent.id))
        .await?;
    ensure!(line.ends_with("alice sent report.pdf (1.2 MB)"), "{line}");
    let shown = eventually("dunst to show it", TIMEOUT, || async {
        let h = dunst.history().await?;
        Ok((!h.is_empty()).then_some(h))
    })
    .await?;
    ensure!(
        shown.len() == 1 && shown[0].2 == "alice sent report.pdf (1.2 MB)",
        "one notification, when complete: {shown:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_file_wait_draws_a_progress_bar_on_a_terminal_until_bob_has_it() -> Result<()> {
    use nes_e2e::frontends::Tmux;
    let w = World::start().await?;
    let (_alice_id, alice, _a) = w.connected_user("alice").await?;
    let (_bob_id, mut bob, _b) = w.connected_user("bob").await?;
    let dir = tempfile::tempdir()?;
    let home = tempfile::tempdir()?;
    let (path, _) = random_file(dir.path(), "bar.bin", 2 * MIB)?;
    // bob is down: the transfer waits, and so does `--wait`, with its bar on the screen.
    bob.stop().await?;
    let env = vec![
        ("NES_SOCKET", alice.socket().display().to_string()),
        ("HOME", home.path().display().to_string()),
        (
            "XDG_CONFIG_HOME",
            home.path().join(".config").display().to_string(),
        ),
        ("LANG", "C.UTF-8".to_string()),
    ];
    let command = format!(
        "'{}' send bob --file '{}' --wait; echo EXIT=$?; sleep 60",
        bin("nes")?.display(),
        path.display()
    );
    let term = Tmux::start(&command, &env, 120, 20).await?;
    let screen = term
        .wait_for("bar.bin")
        .await
        .with_context(|| alice.log_tail(30))?;
    ensure!(screen.contains('%'), "a bar with its percentage: {screen}");
    ensure!(!screen.contains("EXIT="), "still waiting for bob: {screen}");
    bob.start_again().await?;
    let screen = term
        .wait_for("EXIT=0")
        .await
        .with_context(|| alice.log_tail(30))?;
    // Done: the bar is cleared, the file message's id stays.
    ensure!(!screen.contains("bar.bin ["), "{screen}");
    Ok(())
}
