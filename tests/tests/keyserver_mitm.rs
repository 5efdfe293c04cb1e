//! A man in the middle between nesd and the key server.
//!
//! Issue 7: a proxy that (a) answers bob's lookup with carol's signed answer, (b) alters
//! one byte of a key inside bob's answer, (c) replays bob's old answer after his keys
//! changed. nesd must refuse (a) and (b) (Send fails with a clear error and nothing goes
//! to `nes/bob/message`) and must see (c) as a key change (contact KEY_CHANGED, Send
//! refused). In every case the first frame that does reach `nes/bob/message` (sent once
//! the proxy behaves) opens with bob's current private key: nothing was ever sealed to
//! a wrong key.
//!
//! Issue 15: the same proxy stands in for an original key server, which has no prekey
//! endpoint (`Mode::NoPrekeys`), to show which frame version alice's daemon picks for bob
//! and why: v2 while the key server has no prekey for him, v3 once it has, v2 and "lost"
//! (reported, not silent) when it has none again, v1 once bob is marked legacy; bob's
//! daemon receives all of them, and both daemons count them by version.
//!
//! The proxy is plain HTTP/1.1 on a tokio listener (one request per connection) that
//! forwards to the real key server with reqwest and rewrites the answers.

use anyhow::{bail, ensure, Context, Result};
use nes_e2e::frontends::run_nes;
use nes_e2e::*;
use nes_proto::rpc::{self, event::Kind, TrustState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// the proxy

/// What the proxy does to `GET /users/<victim>`.
#[derive(Debug, Clone)]
enum Mode {
    /// Forwards everything unchanged (and records every 200 answer).
    Pass,
    /// Answers with the real answer for another user.
    Swap { victim: String, with: String },
    /// Alters one character inside the base64 of the victim's `public_key_message`.
    FlipByte { victim: String },
    /// Answers with these bytes (a recorded answer).
    Replay { victim: String, body: Vec<u8> },
    /// An original PubKey Service: `/users/<name>/prekey` is no route of its own (the
    /// original reads `prekey` as an unknown token: 404 to GET, and it takes no PUT: 405);
    /// everything else is forwarded.
    NoPrekeys,
}

struct ProxyState {
    mode: Mode,
    /// The last 200 answer per path.
    recorded: HashMap<String, Vec<u8>>,
    /// How many answers were tampered with.
    tampered: usize,
}

/// The man in the middle.
struct Proxy {
    url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(ProxyState {
            mode: Mode::Pass,
            recorded: HashMap::new(),
            tampered: 0,
        }));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, http, upstream) = (shared.clone(), http.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &state, &http, &upstream).await {
                        eprintln!("proxy: {e:#}");
                    }
                });
            }
        });
        Ok(Proxy { url, state, task })
    }

    fn set(&self, mode: Mode) {
        lock(&self.state).mode = mode;
    }

    fn recorded(&self, path: &str) -> Option<Vec<u8>> {
        lock(&self.state).recorded.get(path).cloned()
    }

    fn tampered(&self) -> usize {
        lock(&self.state).tampered
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request: read it, forward (or not), answer, close.
async fn serve(
    mut stream: TcpStream,
    state: &Mutex<ProxyState>,
    http: &reqwest::Client,
    upstream: &str,
) -> Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the client closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
        ensure!(buf.len() < 64 * 1024, "request head too large");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    let mut content_type = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = v.trim().parse()?,
                "content-type" => content_type = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < content_length {
        let mut chunk = vec![0u8; content_length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the client closed before the end of the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }

    let mode = lock(state).mode.clone();
    let target = |user: &str| format!("/users/{user}");
    let (status, answer, tampered) = match &mode {
        Mode::Swap { victim, with } if method == "GET" && path == target(victim) => {
            let (s, b) = forward(
                http,
                "GET",
                &format!("{upstream}{}", target(with)),
                None,
                Vec::new(),
            )
            .await?;
            (s, b, true)
        }
        Mode::FlipByte { victim } if method == "GET" && path == target(victim) => {
            let (s, b) =
                forward(http, "GET", &format!("{upstream}{path}"), None, Vec::new()).await?;
            (s, flip_key_byte(&b)?, true)
        }
        Mode::Replay {
            victim,
            body: recorded,
        } if method == "GET" && path == target(victim) => (200, recorded.clone(), true),
        Mode::NoPrekeys if path.starts_with("/users/") && path.ends_with("/prekey") => {
            let status = if method == "GET" { 404 } else { 405 };
            (status, b"{\"error\":\"not found\"}".to_vec(), true)
        }
        _ => {
            let (s, b) = forward(
                http,
                &method,
                &format!("{upstream}{path}"),
                content_type,
                body,
            )
            .await?;
            if s == 200 && method == "GET" {
                lock(state).recorded.insert(path.clone(), b.clone());
            }
            (s, b, false)
        }
    };
    if tampered {
        lock(state).tampered += 1;
    }
    let reply = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        answer.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(&answer).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn forward(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    content_type: Option<String>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>)> {
    let mut request = http.request(method.parse()?, url);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    if !body.is_empty() {
        request = request.body(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.bytes().await?.to_vec()))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Whatever",
    }
}

/// Changes one base64 character in the middle of `public_key_message` (in the modulus),
/// leaving the JSON well-formed and the key still plausible base64.
fn flip_key_byte(body: &[u8]) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(body)?;
    let field = text
        .find("\"public_key_message\"")
        .context("no public_key_message in the answer")?;
    let spki = field + text[field..].find("MII").context("no base64 key body")?;
    let mut out = body.to_vec();
    // 120 characters in: well inside the modulus of a 2048-bit key, past the DER header.
    let mut at = spki + 120;
    while !out[at].is_ascii_alphanumeric() || out[at - 1] == b'\\' {
        at += 1;
    }
    out[at] = if out[at] == b'A' { b'B' } else { b'A' };
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// the scene

/// A broker, the real key server, the proxy, bob and carol registered, and alice's nesd
/// talking to the key server through the proxy. `wire` watches `nes/bob/message`.
struct Scene {
    w: World,
    proxy: Proxy,
    bob: Identity,
    bob_delete: String,
    carol: Identity,
    _alice: Nesd,
    /// Declared after `_alice`: the daemon stops before its data dir goes.
    _alice_id: Identity,
    a: Client,
    wire: RawMqtt,
}

impl Scene {
    async fn start() -> Result<Scene> {
        let w = World::start().await?;
        let proxy = Proxy::start(w.keyserver.url()).await?;
        let (alice_id, bob, carol) = (
            Identity::generate("alice")?,
            Identity::generate("bob")?,
            Identity::generate("carol")?,
        );
        alice_id.register(&w.keyserver).await?;
        let bob_delete = bob.register(&w.keyserver).await?;
        carol.register(&w.keyserver).await?;
        let mut wire = RawMqtt::connect(&w.broker).await?;
        wire.subscribe("nes/bob/message").await?;
        // alice's nesd asks the proxy for keys, and checks them with the real server's key.
        let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
            .keyserver_url(&proxy.url)
            .start()
            .await?;
        let a = alice.client().await?;
        wait_connected(&a).await?;
        Ok(Scene {
            w,
            proxy,
            bob,
            bob_delete,
            carol,
            _alice: alice,
            _alice_id: alice_id,
            a,
            wire,
        })
    }

    /// What alice's nesd knows of bob (asking the key server, through the proxy, when
    /// `refresh`).
    async fn lookup_bob(&mut self, refresh: bool) -> Result<rpc::Contact, tonic::Status> {
        let request = rpc::LookupContactRequest {
            username: "bob".into(),
            refresh,
        };
        Ok(self.a.lookup_contact(request).await?.into_inner())
    }

    /// alice's Send to bob fails with `code` and a message saying `why`.
    async fn send_refused(&mut self, code: tonic::Code, why: &str) -> Result<()> {
        let e = send(&mut self.a, "bob", "for bob only")
            .await
            .err()
            .context("a send to bob was accepted")?;
        let status = e
            .chain()
            .find_map(|c| c.downcast_ref::<tonic::Status>())
            .context("no gRPC status")?;
        ensure!(status.code() == code, "{status:?}");
        ensure!(
            status.message().contains(why),
            "unclear error: {:?}",
            status.message()
        );
        Ok(())
    }

    /// Nothing is queued or stored for bob, and alice holds no keys for him.
    async fn nothing_for_bob(&mut self) -> Result<()> {
        let h = history(&mut self.a, "bob").await?;
        ensure!(h.is_empty(), "messages to bob were stored: {h:?}");
        let s = status(&mut self.a).await?;
        ensure!(
            s.queued == 0 && s.sent == 0,
            "something was queued or sent: {s:?}"
        );
        let contacts = self
            .a
            .contacts(rpc::ContactsRequest {})
            .await?
            .into_inner()
            .contacts;
        ensure!(
            !contacts.iter().any(|c| c.username == "bob"),
            "keys for bob were cached: {contacts:?}"
        );
        Ok(())
    }

    /// With the proxy honest again, a message to bob goes out, and the first (and only)
    /// frame on `nes/bob/message` opens with bob's current private key: nothing before it
    /// went to bob's topic.
    async fn control_message_opens_with_bobs_key(&mut self) -> Result<()> {
        self.proxy.set(Mode::Pass);
        // nesd repeats a failed lookup for a few seconds without asking again (a flood of
        // frames from made-up names must not become a flood of lookups); ask explicitly.
        self.lookup_bob(true).await?;
        let text = "the control message, sent once the key server's answers are honest";
        let sent = send(&mut self.a, "bob", text).await?;
        let frame = self.wire.next_publish().await?;
        let opened = nes_proto::frame::decrypt(&frame.payload, &self.bob.message)
            .context("the first frame on nes/bob/message does not open with bob's current key")?;
        ensure!(
            opened.inner().message == text,
            "the first frame on bob's topic is {:?}, not the control",
            opened.inner().message
        );
        ensure!(opened.id() == sent.id, "ids differ");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carols_signed_answer_for_bob_is_refused() -> Result<()> {
    let mut s = Scene::start().await?;
    s.proxy.set(Mode::Swap {
        victim: "bob".into(),
        with: "carol".into(),
    });

    s.send_refused(tonic::Code::Unavailable, "about \"carol\", not \"bob\"")
        .await?;
    let e = s
        .lookup_bob(true)
        .await
        .expect_err("LookupContact accepted carol's answer for bob");
    ensure!(
        e.message().contains("not \"bob\""),
        "unclear error: {:?}",
        e.message()
    );
    ensure!(
        s.proxy.tampered() >= 2,
        "the proxy was not asked: {}",
        s.proxy.tampered()
    );
    s.nothing_for_bob().await?;
    ensure!(
        !s.a.contacts(rpc::ContactsRequest {})
            .await?
            .into_inner()
            .contacts
            .iter()
            .any(|c| c.username == "carol"),
        "carol's keys were cached"
    );

    s.control_message_opens_with_bobs_key().await?;
    let contact = s.lookup_bob(false).await?;
    ensure!(
        contact.message_key_fingerprint == s.bob.message.public_key().fingerprint(),
        "bob pinned with the wrong key"
    );
    ensure!(contact.message_key_fingerprint != s.carol.message.public_key().fingerprint());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_one_byte_of_a_key_changed_is_refused() -> Result<()> {
    let mut s = Scene::start().await?;
    s.proxy.set(Mode::FlipByte {
        victim: "bob".into(),
    });

    s.send_refused(tonic::Code::Unavailable, "signature does not verify")
        .await?;
    ensure!(s.proxy.tampered() >= 1, "the proxy was not asked");
    s.nothing_for_bob().await?;

    s.control_message_opens_with_bobs_key().await?;
    let contact = s.lookup_bob(false).await?;
    ensure!(
        contact.message_key_fingerprint == s.bob.message.public_key().fingerprint(),
        "bob pinned with the wrong key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_answer_replayed_after_a_key_change_is_a_key_change() -> Result<()> {
    let mut s = Scene::start().await?;
    // The attacker records bob's answer while it is current...
    let r = reqwest::get(format!("{}/users/bob", s.proxy.url)).await?;
    ensure!(
        r.status() == 200,
        "lookup through the proxy: {}",
        r.status()
    );
    let old_answer = s.proxy.recorded("/users/bob").context("nothing recorded")?;
    let (old_message_fp, old_sign_fp) = (
        s.bob.message.public_key().fingerprint(),
        s.bob.sign.public_key().fingerprint(),
    );

    // ... bob changes keys (deletes his entry, registers new keys) ...
    s.w.keyserver.post_ok(&s.bob_delete).await?;
    s.bob.rekey()?;
    s.bob.register(&s.w.keyserver).await?;
    let (new_message_fp, new_sign_fp) = (
        s.bob.message.public_key().fingerprint(),
        s.bob.sign.public_key().fingerprint(),
    );

    // ... alice learns the new keys ...
    let contact = s.lookup_bob(false).await?;
    ensure!(
        contact.message_key_fingerprint == new_message_fp
            && contact.sign_key_fingerprint == new_sign_fp
    );
    ensure!(contact.trust == TrustState::Pinned as i32);

    // ... and the attacker replays the old, validly signed answer.
    let mut events = EventStream::open(&s.a, None).await?;
    s.proxy.set(Mode::Replay {
        victim: "bob".into(),
        body: old_answer,
    });
    let contact = s.lookup_bob(true).await?;
    ensure!(s.proxy.tampered() >= 1, "the proxy was not asked");
    ensure!(
        contact.trust == TrustState::KeyChanged as i32,
        "the replay was not seen as a key change: {contact:?}"
    );
    ensure!(
        contact.message_key_fingerprint == new_message_fp,
        "the pinned keys moved: {contact:?}"
    );
    ensure!(
        contact.pending_message_key_fingerprint == old_message_fp
            && contact.pending_sign_key_fingerprint == old_sign_fp
    );
    let changed = events
        .next_matching("a KeyChanged event", |e| match &e.kind {
            Some(Kind::KeyChanged(k)) if k.username == "bob" => Some(k.clone()),
            _ => None,
        })
        .await?;
    ensure!(
        changed.new_message_key == old_message_fp && changed.old_message_key == new_message_fp,
        "{changed:?}"
    );

    // Sending is refused until the user decides.
    s.send_refused(tonic::Code::FailedPrecondition, "changed")
        .await?;
    ensure!(
        history(&mut s.a, "bob").await?.is_empty(),
        "a message to bob was stored"
    );

    // The key server is honest again: the doubt goes away and the control message is
    // sealed to bob's current key, the first frame on his topic.
    s.proxy.set(Mode::Pass);
    let contact = s.lookup_bob(true).await?;
    ensure!(contact.trust == TrustState::Pinned as i32, "{contact:?}");
    s.control_message_opens_with_bobs_key().await?;
    Ok(())
}

/// What alice's daemon says about bob: (frame version, reason, prekey lost).
async fn version_for_bob(a: &mut Client, refresh: bool) -> Result<(u32, String, bool)> {
    let c = a
        .lookup_contact(rpc::LookupContactRequest {
            username: "bob".into(),
            refresh,
        })
        .await?
        .into_inner();
    Ok((c.frame_version, c.frame_version_reason, c.prekey_lost))
}

/// Sends `text` to bob, checks the version it went out as and that bob's daemon stored it
/// from a frame of that version.
async fn send_as(a: &mut Client, b: &Client, text: &str, version: u32) -> Result<()> {
    let sent = send(a, "bob", text).await?;
    ensure!(
        sent.wire_version == version,
        "{text:?} went out as v{}, not v{version}",
        sent.wire_version
    );
    wait_history(b, "alice", 1, |m| {
        m.id == sent.id && m.text == text && m.wire_version == version
    })
    .await
    .with_context(|| format!("bob never received {text:?} as v{version}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_without_a_prekey_endpoint_v3_with_one_lost_is_reported_v1_to_legacy() -> Result<()> {
    let w = World::start().await?;
    let proxy = Proxy::start(w.keyserver.url()).await?;
    proxy.set(Mode::NoPrekeys);
    let (_bob_id, bob) = w.user("bob").await?;
    let b = bob.client().await?;
    wait_prekey_published(&b, None).await?;
    let alice_id = Identity::generate("alice")?;
    alice_id.register(&w.keyserver).await?;
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .keyserver_url(&proxy.url)
        .start()
        .await?;
    let mut a = alice.client().await?;
    wait_connected(&a).await?;

    // An original key server: no prekey for bob, so v2, and nothing was ever lost.
    let (v, why, lost) = version_for_bob(&mut a, false).await?;
    ensure!(v == 2 && !lost, "v{v} lost={lost}: {why}");
    ensure!(why.contains("no prekey"), "reason: {why}");
    send_as(&mut a, &b, "v2: the key server has no prekey endpoint", 2).await?;

    // The key server answers bob's prekey: v3.
    proxy.set(Mode::Pass);
    let (v, why, lost) = version_for_bob(&mut a, true).await?;
    ensure!(v == 3 && !lost, "v{v} lost={lost}: {why}");
    ensure!(why.starts_with("v3: prekey "), "reason: {why}");
    send_as(&mut a, &b, "v3: forward secrecy", 3).await?;

    // The prekey disappears: v2, reported in the contact and in status, not silent.
    proxy.set(Mode::NoPrekeys);
    let (v, why, lost) = version_for_bob(&mut a, true).await?;
    ensure!(v == 2 && lost, "v{v} lost={lost}: {why}");
    ensure!(why.contains("HAD v3 prekeys"), "reason: {why}");
    let s = status(&mut a).await?;
    ensure!(s.prekeys_lost == ["bob"], "status: {:?}", s.prekeys_lost);
    let home = tempfile::tempdir()?;
    let shown = run_nes(
        &alice.socket(),
        home.path(),
        &["contacts", "show", "bob"],
        b"",
    )
    .await?
    .expect_code(0)?;
    ensure!(
        shown
            .stdout
            .contains("sends as:    v2: the contact HAD v3 prekeys")
            && shown.stdout.contains("[PREKEY LOST]"),
        "nes contacts show bob:\n{}",
        shown.stdout
    );
    let listed = run_nes(&alice.socket(), home.path(), &["contacts"], b"")
        .await?
        .expect_code(0)?;
    ensure!(
        listed.stdout.contains("PREKEY LOST (gets v2)"),
        "nes contacts:\n{}",
        listed.stdout
    );
    let text = run_nes(&alice.socket(), home.path(), &["status"], b"")
        .await?
        .expect_code(0)?;
    ensure!(
        text.stdout.contains("LOST PREKEYS: bob had v3 prekeys"),
        "nes status:\n{}",
        text.stdout
    );
    send_as(&mut a, &b, "v2 again: bob's prekey is gone", 2).await?;

    // A legacy contact: v1.
    let c = a
        .set_contact_legacy(rpc::SetContactLegacyRequest {
            username: "bob".into(),
            legacy: true,
        })
        .await?
        .into_inner();
    ensure!(
        c.frame_version == 1,
        "legacy contact gets v{}",
        c.frame_version
    );
    send_as(&mut a, &b, "v1 to a legacy contact", 1).await?;

    // Each counted by version on both sides.
    let sa = status(&mut a).await?;
    ensure!(
        (sa.sent_v1, sa.sent_v2, sa.sent_v3) == (1, 2, 1),
        "alice sent v1 {} v2 {} v3 {}",
        sa.sent_v1,
        sa.sent_v2,
        sa.sent_v3
    );
    let mut b = b;
    let sb = status(&mut b).await?;
    ensure!(
        (sb.received_v1, sb.received_v2, sb.received_v3, sb.received) == (1, 2, 1, 4),
        "bob received v1 {} v2 {} v3 {} (all {})",
        sb.received_v1,
        sb.received_v2,
        sb.received_v3,
        sb.received
    );
    let json = run_nes(&bob.socket(), home.path(), &["status", "--json"], b"")
        .await?
        .expect_code(0)?;
    let v: serde_json::Value = serde_json::from_str(&json.stdout)?;
    ensure!(
        v["received_by_version"] == serde_json::json!({"v1": 1, "v2": 2, "v3": 1}),
        "bob's status --json: {v}"
    );
    Ok(())
}
