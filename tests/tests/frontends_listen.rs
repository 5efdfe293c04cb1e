//! `nes listen`: several listeners at once, resuming by cursor after a kill, following a
//! daemon restart, and the scripting flags (--count, --timeout, --from, --exec, SIGPIPE).

use anyhow::Result;
use nes_e2e::frontends::{json_lines, nes, run, run_nes, Lines};
use nes_e2e::{send, status, World};
use serde_json::Value;

/// The event number inside a log cursor (the JSON `cursor` is an opaque string).
fn cursor_number(cursor: &Value) -> u64 {
    let text = cursor
        .as_str()
        .unwrap_or_else(|| panic!("cursor {cursor} is not a string"));
    text.split('-')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in cursor {text}"))
}

fn texts(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|v| v["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_get_every_message_once_across_a_kill_and_a_daemon_restart() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, mut bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let mut alice = alice_d.client().await?;
    let start = status(&mut bob_d.client().await?)
        .await?
        .last_cursor
        .to_string();

    let listen = |since: &str| -> Result<Lines> {
        let mut cmd = nes(&bob_d.socket(), home.path())?;
        cmd.args(["listen", "--json", "--since", since]);
        Lines::spawn(cmd)
    };
    let mut first = listen(&start)?;
    let mut second = listen(&start)?;
    for text in ["m1", "m2", "m3"] {
        send(&mut alice, "bob", text).await?;
    }
    let got1 = json_lines(first.until(3).await?)?;
    let got2 = json_lines(second.until(3).await?)?;
    assert_eq!(texts(&got1), ["m1", "m2", "m3"]);
    assert_eq!(got1, got2, "both listeners print the same lines");
    for line in &got1 {
        for field in [
            "id",
            "from",
            "to",
            "timestamp",
            "message",
            "direction",
            "state",
            "cursor",
        ] {
            assert!(line.get(field).is_some(), "{field} in {line}");
        }
        assert_eq!(line["from"], "alice");
        assert_eq!(line["direction"], "incoming");
        assert_eq!(line["state"], "received");
    }
    // Cursors are opaque strings (`<store id>-<number>-<tag>`); the number in them grows.
    let cursors: Vec<u64> = got1.iter().map(|l| cursor_number(&l["cursor"])).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors grow: {cursors:?}"
    );

    // Kill the second one; what arrives meanwhile is there when it resumes with --since.
    let resume_at = got2[2]["cursor"].as_str().unwrap().to_string();
    second.kill().await?;
    for text in ["m4", "m5"] {
        send(&mut alice, "bob", text).await?;
    }
    let mut second = listen(&resume_at)?;
    let resumed = json_lines(second.until(2).await?)?;
    assert_eq!(
        texts(&resumed),
        ["m4", "m5"],
        "nothing lost, nothing repeated"
    );
    let got1 = json_lines(first.until(5).await?)?;
    assert_eq!(texts(&got1), ["m1", "m2", "m3", "m4", "m5"]);

    // Stop bob's daemon under the running listeners; alice sends meanwhile (the broker
    // keeps it); bob's daemon comes back and the listeners pick up where they were.
    bob_d.stop().await?;
    send(&mut alice, "bob", "while bob's daemon was down").await?;
    bob_d.start_again().await?;
    send(&mut alice, "bob", "after the restart").await?;
    let got1 = json_lines(first.until(7).await?)?;
    let got2 = json_lines(second.until(4).await?)?;
    assert_eq!(
        texts(&got1[5..]),
        ["while bob's daemon was down", "after the restart"]
    );
    assert_eq!(
        texts(&got2[2..]),
        ["while bob's daemon was down", "after the restart"]
    );
    assert!(
        first.stderr().contains("reconnected"),
        "the listener said it reconnected: {}",
        first.stderr()
    );
    let ids: std::collections::HashSet<_> = got1
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 7, "every message exactly once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_timeout_from_exec_and_a_closed_pipe() -> Result<()> {
    let world = World::start().await?;
    let (_alice, alice_d) = world.user("alice").await?;
    let (_bob, bob_d) = world.user("bob").await?;
    let home = tempfile::tempdir()?;
    let (b, h) = (bob_d.socket(), home.path());
    let start = status(&mut bob_d.client().await?)
        .await?
        .last_cursor
        .to_string();
    let mut alice = alice_d.client().await?;
    for text in ["first", "second", "third\nwith a second line"] {
        send(&mut alice, "bob", text).await?;
    }

    // --count stops after N (replayed from --since); exit 0.
    let out = run_nes(
        &b,
        h,
        &["listen", "--json", "--since", &start, "--count", "2"],
        b"",
    )
    .await?
    .expect_code(0)?;
    let lines = json_lines(&out.stdout.lines().map(String::from).collect::<Vec<_>>())?;
    assert_eq!(texts(&lines), ["first", "second"]);
    // The text appears once, newline and all, inside one JSON line.
    let out = run_nes(
        &b,
        h,
        &["listen", "--json", "--since", &start, "--count", "3"],
        b"",
    )
    .await?
    .expect_code(0)?;
    assert_eq!(out.stdout.lines().count(), 3);
    assert!(out.stdout.contains("third\\nwith a second line"));

    // --from filters by sender; --timeout ends the wait: exit 0 without --count, exit 1
    // when fewer than --count came.
    let out = run_nes(
        &b,
        h,
        &[
            "listen",
            "--json",
            "--since",
            &start,
            "--from",
            "carol",
            "--timeout",
            "1",
        ],
        b"",
    )
    .await?
    .expect_code(0)?;
    assert_eq!(out.stdout, "");
    let out = run_nes(
        &b,
        h,
        &[
            "listen",
            "--since",
            &start,
            "--from",
            "carol",
            "--count",
            "1",
            "--timeout",
            "1",
        ],
        b"",
    )
    .await?
    .expect_code(1)?;
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    let out = run_nes(
        &b,
        h,
        &[
            "listen", "--json", "--since", &start, "--from", "alice", "--count", "1",
        ],
        b"",
    )
    .await?
    .expect_code(0)?;
    assert_eq!(out.stdout.lines().count(), 1);
    let out = run_nes(&b, h, &["listen", "--from", "NOT OK"], b"")
        .await?
        .expect_code(1)?;
    assert!(out.stderr.contains("--from"), "{}", out.stderr);
    // Without --json: one line for people.
    let out = run_nes(&b, h, &["listen", "--since", &start, "--count", "1"], b"")
        .await?
        .expect_code(0)?;
    assert!(out.stdout.contains("alice → bob: first"), "{}", out.stdout);

    // --exec: the text on stdin, the rest in the environment, one run per message.
    let exec = r#"printf '%s|%s|%s|%s|' "$NES_FROM" "$NES_ID" "$NES_CURSOR" "$NES_TIMESTAMP"; tr '\n' '/'; echo"#;
    let out = run_nes(
        &b,
        h,
        &["listen", "--since", &start, "--count", "3", "--exec", exec],
        b"",
    )
    .await?
    .expect_code(0)?;
    let runs: Vec<Vec<&str>> = out.stdout.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(runs.len(), 3, "{}", out.stdout);
    assert_eq!(runs[0][0], "alice");
    assert!(runs[0][1].ends_with("=="), "NES_ID: {}", runs[0][1]);
    assert!(
        cursor_number(&Value::from(runs[0][2])) > 0
            && runs[0][3].parse::<i64>().unwrap() > 1_600_000_000_000
    );
    assert_eq!(
        runs.iter().map(|r| r[4]).collect::<Vec<_>>(),
        ["first", "second", "third/with a second line"]
    );
    // A failing --exec command is reported and listening goes on.
    let out = run_nes(
        &b,
        h,
        &[
            "listen", "--since", &start, "--count", "2", "--exec", "exit 7",
        ],
        b"",
    )
    .await?
    .expect_code(0)?;
    assert!(out.stderr.contains("exit status: 7"), "{}", out.stderr);

    // A reader that goes away (`| head -n 1`) ends listen with exit 0, no error message.
    let mut cmd = tokio::process::Command::new("bash");
    nes_e2e::frontends::isolate(&mut cmd, h);
    cmd.arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' --socket '{}' listen --json --since {start} | head -n 1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\"",
            nes_e2e::bin("nes")?.display(),
            b.display()
        ));
    let out = run(cmd, b"").await?;
    assert!(
        out.stdout.contains("status=0"),
        "{} / {}",
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stderr.contains("nes:"),
        "no complaint on a closed pipe: {}",
        out.stderr
    );
    Ok(())
}
