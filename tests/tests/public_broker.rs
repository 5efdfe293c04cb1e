//! nesd end to end, as an attacker on a public broker would try it (issue 14).
//!
//! Replays: an original (v1) frame republished with its outer JSON re-encoded
//! (whitespace, key order, an extra field) is the same message, refused as a duplicate
//! and stored once; another frame of the same sender still gets through.

use anyhow::{ensure, Context, Result};
use nes_e2e::*;
use nes_proto::frame;
use nes_proto::rpc::Direction;
use std::collections::HashMap;

async fn refused(client: &Client) -> Result<HashMap<String, u64>> {
    let mut c = client.clone();
    Ok(status(&mut c).await?.refused)
}

async fn wait_refused(client: &Client, reason: &str, n: u64) -> Result<HashMap<String, u64>> {
    eventually(
        &format!("{n} refusals as {reason}"),
        TIMEOUT,
        || async move {
            let all = refused(client).await?;
            Ok((all.get(reason).copied().unwrap_or(0) >= n).then_some(all))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_encoded_v1_replays_are_duplicates() -> Result<()> {
    let w = World::start().await?;
    let _alice_id = w.vector_identity("alice").await?;
    let bob_id = w.vector_identity("bob").await?;
    let bob = Nesd::start(&bob_id, &w.broker, &w.keyserver).await?;
    let mut b = bob.client().await?;
    wait_connected(&b).await?;

    // The original client's frame, byte for byte as it published it.
    let base = vectors().join("frames/frame-01");
    let original = std::fs::read(base.with_extension("json"))?;
    let text = std::fs::read_to_string(format!("{}.message.txt", base.display()))?;
    let id = frame::v1_id(&original).context("the vector is a v1 frame")?;
    let mut wire = RawMqtt::connect(&w.broker).await?;
    wire.publish("nes/bob/message", original.clone()).await?;
    let h = wait_history(&b, "alice", 1, |m| {
        m.direction == Direction::Incoming as i32
    })
    .await?;
    ensure!(
        h.len() == 1 && h[0].id == id && h[0].text == text,
        "history {h:?}"
    );

    // The same frame, re-encoded three ways: what anyone on the broker can do with it.
    let json: serde_json::Value = serde_json::from_slice(&original)?;
    let field = |name: &str| {
        json[name]
            .as_str()
            .map(str::to_owned)
            .context("a string field")
    };
    let (ck, ct, sig) = (
        field("cipherkey")?,
        field("ciphertext")?,
        field("signature")?,
    );
    let replays = [
        format!("{{ \"cipherkey\" : \"{ck}\",\n  \"ciphertext\" : \"{ct}\",\n  \"signature\" : \"{sig}\" }}\n"),
        format!(r#"{{"signature":"{sig}","cipherkey":"{ck}","ciphertext":"{ct}"}}"#),
        format!(r#"{{"cipherkey":"{ck}","ciphertext":"{ct}","signature":"{sig}","note":"replayed"}}"#),
    ];
    for replay in &replays {
        ensure!(replay.as_bytes() != original.as_slice());
        wire.publish("nes/bob/message", replay.clone().into_bytes())
            .await?;
    }
    // And the exact bytes once more.
    wire.publish("nes/bob/message", original.clone()).await?;
    let counts = wait_refused(&b, "duplicate", 4).await?;
    let total: u64 = counts.values().sum();
    ensure!(total == 4, "only duplicates refused: {counts:?}");

    // A different frame of the same sender is still a new message, after the replays.
    let next = vectors().join("frames/frame-02");
    wire.publish(
        "nes/bob/message",
        std::fs::read(next.with_extension("json"))?,
    )
    .await?;
    let next_text = std::fs::read_to_string(format!("{}.message.txt", next.display()))?;
    let h = wait_history(&b, "alice", 1, |m| m.text == next_text).await?;
    let texts: Vec<&str> = h.iter().map(|m| m.text.as_str()).collect();
    ensure!(
        texts == [text.as_str(), next_text.as_str()],
        "stored once each: {texts:?}"
    );
    ensure!(history(&mut b, "alice").await?.len() == 2);
    let st = status(&mut b).await?;
    ensure!(st.received == 2, "received {}", st.received);
    ensure!(
        st.refused.get("duplicate") == Some(&4),
        "refused {:?}",
        st.refused
    );
    Ok(())
}
