//! A contact's key change as the frontends show it: `nes chat` marks it, `nes send` is
//! refused with a reason, `nes contacts show` gives old and new fingerprints, `nes
//! contacts trust` accepts them, and the held message then reaches `nes listen` and the
//! chat with its text.

use anyhow::Result;
use nes_e2e::frontends::{json_lines, nes, run_nes, Lines, Tmux};
use nes_e2e::{bin, eventually, history, send, status, Identity, Nesd, World, TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_is_shown_refused_and_trusted_through_the_frontends() -> Result<()> {
    let w = World::start().await?;
    let mut carol_id = Identity::generate("carol")?;
    let carol_delete = carol_id.register(&w.keyserver).await?;
    let mut carol = Nesd::start(&carol_id, &w.broker, &w.keyserver).await?;
    let (_bob_id, bob) = w.user("bob").await?;
    let home = tempfile::tempdir()?;
    let (b, h) = (bob.socket(), home.path());
    let mut bob_client = bob.client().await?;

    // bob pins carol's first keys.
    send(&mut carol.client().await?, "bob", "before the change").await?;
    eventually("bob got the first message", TIMEOUT, || {
        let mut c = bob_client.clone();
        async move { Ok((!history(&mut c, "carol").await?.is_empty()).then_some(())) }
    })
    .await?;
    let since = status(&mut bob_client).await?.last_cursor.to_string();
    let mut listen = {
        let mut cmd = nes(&b, h)?;
        cmd.args(["listen", "--json", "--since", &since]);
        Lines::spawn(cmd)?
    };
    let env = vec![
        ("NES_SOCKET", b.display().to_string()),
        ("HOME", h.display().to_string()),
        ("LANG", "C.UTF-8".to_string()),
    ];
    let chat = Tmux::start(
        &format!("'{}' chat -t carol", bin("nes")?.display()),
        &env,
        160,
        30,
    )
    .await?;
    chat.wait_for("carol: before the change").await?;

    // carol re-registers with new keys and writes again.
    w.keyserver.post_ok(&carol_delete).await?;
    carol.stop().await?;
    carol_id.rekey()?;
    carol_id.register(&w.keyserver).await?;
    carol.start_again().await?;
    let second = send(&mut carol.client().await?, "bob", "after the change").await?;

    let screen = chat.wait_for("KEYS CHANGED").await?;
    assert!(
        screen.contains("nes contacts trust carol"),
        "the chat says what to do:\n{screen}"
    );
    chat.wait_for("carol: (held: sender's keys changed)")
        .await?;
    let out = run_nes(&b, h, &["send", "carol", "hi"], b"")
        .await?
        .expect_code(1)?;
    assert!(!out.stderr.trim().is_empty(), "the refusal says why");
    let out = run_nes(&b, h, &["contacts", "show", "carol"], b"")
        .await?
        .expect_code(0)?;
    let new_sign = carol_id.sign.public_key().fingerprint();
    assert!(
        out.stdout.contains("KEYS CHANGED")
            && out
                .stdout
                .contains(&format!("new sign key:    sha256:{new_sign}")),
        "{}",
        out.stdout
    );
    let out = run_nes(&b, h, &["contacts"], b"").await?.expect_code(0)?;
    assert!(out.stdout.contains("key-changed"), "{}", out.stdout);
    // Trusting other fingerprints than the pending ones is refused.
    let wrong = "00".repeat(32);
    let out = run_nes(
        &b,
        h,
        &[
            "contacts",
            "trust",
            "carol",
            "--message-key",
            &wrong,
            "--sign-key",
            &wrong,
        ],
        b"",
    )
    .await?
    .expect_code(1)?;
    assert!(!out.stderr.trim().is_empty());

    let out = run_nes(&b, h, &["contacts", "trust", "carol"], b"")
        .await?
        .expect_code(0)?;
    assert!(
        out.stdout.contains(&new_sign) && out.stdout.contains("pinned"),
        "{}",
        out.stdout
    );
    chat.wait_for("carol's new keys are trusted").await?;
    chat.wait_for("carol: after the change").await?;
    let line = loop {
        let line = json_lines(&[listen.next().await?])?.remove(0);
        if line["id"] == second.id.as_str() {
            break line;
        }
    };
    assert_eq!(line["message"], "after the change");
    assert_eq!(line["state"], "received");
    run_nes(&b, h, &["send", "carol", "welcome back"], b"")
        .await?
        .expect_code(0)?;
    Ok(())
}
