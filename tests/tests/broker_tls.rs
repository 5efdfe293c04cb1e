//! nesd against a private broker: mosquitto with a TLS listener (a CA and server
//! certificate made by the test with the `openssl` command line), a password file made
//! with `mosquitto_passwd -b`, an ACL in which each user may read only its own topic and
//! write to everyone's, and `allow_anonymous false`; the recommended setup of
//! docs/BROKER.md.
//!
//! Issue 14, item 5: two daemons exchange messages over mqtts with user and password; a
//! wrong password and a server certificate from an unknown CA fail clearly (status says
//! not connected, the log says why, nothing crashes); an oversized publish does not break
//! a 3.1.1 session (nesd reads it once and acknowledges it away) and never reaches an MQTT 5
//! one (the broker drops it); the client id shown by Status is not the full id.

use anyhow::{anyhow, ensure, Context, Result};
use nes_e2e::*;
use nes_proto::rpc;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, TlsConfiguration, Transport};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::sync::mpsc;

/// The users of the test broker and their passwords.
const USERS: &[(&str, &str)] = &[
    ("alice", "alice-pw-1"),
    ("bob", "bob-pw-2"),
    ("carol", "carol-pw-3"),
];

/// The broker's certificates, password file and ACL, in one temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A self-signed CA: `<name>.pem`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) -> Result<()> {
    run(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.pem"),
        "-days",
        "2",
        "-subj",
        &format!("/CN=NES test {name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]))
}

impl Pki {
    fn make() -> Result<Pki> {
        let dir = tempfile::Builder::new().prefix("nes-pki-").tempdir()?;
        let d = dir.path();
        make_ca(d, "ca")?;
        make_ca(d, "other-ca")?;
        run(Command::new("openssl").current_dir(d).args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]))?;
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        run(Command::new("openssl").current_dir(d).args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]))?;
        for (i, (user, password)) in USERS.iter().enumerate() {
            let mut cmd = Command::new("mosquitto_passwd");
            if i == 0 {
                cmd.arg("-c");
            }
            run(cmd.arg("-b").arg(d.join("passwd")).arg(user).arg(password))?;
            // nesd's side: a password file only its owner can read.
            let file = d.join(format!("{user}.password"));
            std::fs::write(&file, format!("{password}\n"))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(d.join("wrong.password"), "not-the-password\n")?;
        std::fs::set_permissions(
            d.join("wrong.password"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        // docs/BROKER.md: read only your own topic, write anyone's.
        std::fs::write(
            d.join("acl"),
            "pattern read nes/%u/message\npattern write nes/+/message\n",
        )?;
        Ok(Pki { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The listener and auth lines for mosquitto.
    fn broker_config(&self) -> String {
        format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
            self.path("ca.pem").display(),
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("passwd").display(),
            self.path("acl").display(),
        )
    }
}

/// A [`World`] whose broker is the private one (its `broker` and `keyserver` are this
/// world's), and the files it was made with.
struct SecureWorld {
    pki: Pki,
    world: World,
}

impl std::ops::Deref for SecureWorld {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl SecureWorld {
    async fn start() -> Result<SecureWorld> {
        let pki = Pki::make()?;
        let world = World::start_with_broker(&pki.broker_config(), true).await?;
        ensure!(
            world.broker.url().starts_with("mqtts://"),
            "{}",
            world.broker.url()
        );
        Ok(SecureWorld { pki, world })
    }

    /// The flags that log `user` in over TLS, trusting `ca` and reading `password_file`.
    fn flags(&self, user: &str, ca: &str, password_file: &str) -> Vec<String> {
        vec![
            "--broker-ca".into(),
            self.pki.path(ca).display().to_string(),
            "--broker-user".into(),
            user.into(),
            "--broker-password-file".into(),
            self.pki.path(password_file).display().to_string(),
        ]
    }

    /// A registered identity with a nesd logged in as itself.
    async fn user(&self, name: &str) -> Result<(Identity, Nesd)> {
        self.user_with(name, &[]).await
    }

    /// Like [`SecureWorld::user`], with more flags for nesd.
    async fn user_with(&self, name: &str, extra: &[&str]) -> Result<(Identity, Nesd)> {
        let mut flags = self.flags(name, "ca.pem", &format!("{name}.password"));
        flags.extend(extra.iter().map(|f| f.to_string()));
        self.world.user_with(name, flags).await
    }

    /// A plain MQTT client over TLS, logged in as `user`; its publishes and SUBACKs are
    /// reported on the channels.
    async fn raw(&self, user: &str) -> Result<RawTls> {
        let password = USERS
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, p)| *p)
            .ok_or_else(|| anyhow!("no user {user}"))?;
        // rumqttc builds the TLS settings of `Simple` with rustls's process-wide provider,
        // which must be chosen: the build has two (aws-lc-rs and reqwest's ring). Once.
        let _ =
            rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut options = MqttOptions::new(
            format!("raw-{user}-{}", free_port()?),
            "localhost",
            self.broker.port(),
        );
        options
            .set_clean_session(true)
            .set_credentials(user, password)
            .set_max_packet_size(1024 * 1024, 1024 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: std::fs::read(self.pki.path("ca.pem"))?,
                alpn: None,
                client_auth: None,
            }));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let first = tokio::time::timeout(TIMEOUT, rx.recv()).await?;
        ensure!(
            matches!(first, Some(Packet::ConnAck(_))),
            "raw client {user}: {first:?}"
        );
        Ok(RawTls {
            client,
            packets: rx,
            task,
        })
    }
}

struct RawTls {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl RawTls {
    /// The next packet of the kind `pick` accepts (others are skipped).
    async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(Packet) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let p = tokio::time::timeout_at(deadline, self.packets.recv())
                .await
                .map_err(|_| anyhow!("raw client: no {what}"))?
                .ok_or_else(|| anyhow!("raw client stopped"))?;
            if let Some(v) = pick(p) {
                return Ok(v);
            }
        }
    }
}

impl Drop for RawTls {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for `n` messages from `from` and returns them, oldest first.
async fn received(client: &Client, from: &str, n: usize) -> Result<Vec<rpc::Message>> {
    let all = wait_history(client, from, n, incoming_from(from)).await?;
    Ok(all.into_iter().filter(incoming_from(from)).collect())
}

async fn wait_log(nesd: &Nesd, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    eventually(what, TIMEOUT, || {
        let text = std::fs::read_to_string(nesd.log_path()).unwrap_or_default();
        let hit = ok(&text).then_some(text);
        async move { Ok(hit) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_talk_over_tls_with_passwords_and_an_acl() -> Result<()> {
    let w = SecureWorld::start().await?;
    let (alice_id, alice) = w.user("alice").await?;
    let (_bob_id, bob) = w.user("bob").await?;
    let mut a = alice.client().await?;
    let mut b = bob.client().await?;
    wait_connected(&a).await?;
    wait_connected(&b).await?;

    // alice's own raw client subscribes to bob's topic (the ACL must keep bob's frames
    // from it) and to her own.
    let mut spy = w.raw("alice").await?;
    for topic in ["nes/bob/message", "nes/alice/message"] {
        spy.client.subscribe(topic, QoS::AtLeastOnce).await?;
        spy.next("SUBACK", |p| matches!(p, Packet::SubAck(_)).then_some(()))
            .await?;
    }

    let to_bob = send(&mut a, "bob", "over TLS to bob").await?;
    let got = received(&b, "alice", 1).await?;
    ensure!(
        got[0].text == "over TLS to bob" && got[0].id == to_bob.id,
        "bob got {:?}",
        got[0]
    );
    send(&mut b, "alice", "and back to alice").await?;
    let got = received(&a, "bob", 1).await?;
    ensure!(got[0].text == "and back to alice", "alice got {:?}", got[0]);

    // The spy's first frame is bob's reply on alice's topic: alice's earlier frame to bob
    // was published first, so had the ACL let it through it would have come first.
    let topic = spy
        .next("a publish", |p| match p {
            Packet::Publish(p) => Some(p.topic),
            _ => None,
        })
        .await?;
    ensure!(
        topic == "nes/alice/message",
        "alice could read {topic}: the ACL did not hold"
    );

    // The client id: Status shows a prefix only, never the 128-bit device id.
    let device = std::fs::read_to_string(alice_id.data_dir().join("device-id"))?
        .trim()
        .to_owned();
    ensure!(
        device.len() == 32 && device.bytes().all(|c| c.is_ascii_hexdigit()),
        "device id {device:?}"
    );
    let s = status(&mut a).await?;
    ensure!(
        s.client_id.starts_with("nes-alice-"),
        "client id {}",
        s.client_id
    );
    ensure!(
        !s.client_id.contains(&device),
        "Status shows the full client id {}",
        s.client_id
    );
    ensure!(
        s.client_id.contains(&device[..8]),
        "Status shows no prefix: {}",
        s.client_id
    );
    let log = std::fs::read_to_string(alice.log_path())?;
    ensure!(!log.contains(&device), "the log shows the full client id");
    ensure!(!log.contains("alice-pw-1"), "the log shows the password");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_clearly() -> Result<()> {
    let w = SecureWorld::start().await?;
    let id = Identity::generate("carol")?;
    id.register(&w.keyserver).await?;
    let flags = w.flags("carol", "ca.pem", "wrong.password");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let carol = Nesd::builder(&id, &w.broker, &w.keyserver)
        .args(flags)
        .start()
        .await?;
    let log = wait_log(&carol, "the refusal in carol's log", |t| {
        t.contains("cannot connect to the broker")
    })
    .await?;
    ensure!(
        log.contains("NotAuthorized") || log.contains("BadUserNamePassword"),
        "the log does not say why:\n{log}"
    );
    // Still running, still answering, not connected.
    let s = status(&mut carol.client().await?).await?;
    ensure!(!s.connected, "connected with a wrong password");

    // A password file others may read is refused at start, saying how to fix it; there
    // is no flag for the password itself.
    let loose = w.pki.path("loose.password");
    std::fs::write(&loose, "carol-pw-3\n")?;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644))?;
    let loose = loose.display().to_string();
    let data_dir = id.data_dir().display().to_string();
    let url = w.broker.url();
    let ks = w.keyserver.url();
    let base = [
        "--user",
        "carol",
        "--broker",
        &url,
        "--keyserver",
        &ks,
        "--data-dir",
        &data_dir,
        "--broker-user",
        "carol",
    ];
    let mut args = base.to_vec();
    args.extend(["--broker-password-file", &loose]);
    let (code, err) = Nesd::run_once(&args, &[])?;
    ensure!(code == 1 && err.contains("chmod 600"), "exit {code}: {err}");
    let mut args = base.to_vec();
    args.extend(["--broker-password", "carol-pw-3"]);
    let (code, err) = Nesd::run_once(&args, &[])?;
    ensure!(
        code == 2,
        "a password flag was accepted: exit {code}: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_unknown_ca_is_refused() -> Result<()> {
    let w = SecureWorld::start().await?;
    let id = Identity::generate("alice")?;
    id.register(&w.keyserver).await?;
    // Trusting another CA, then the system's roots (the default): both refuse the
    // broker's certificate.
    let other = w.flags("alice", "other-ca.pem", "alice.password");
    let system: Vec<String> = other[2..].to_vec();
    for flags in [other, system] {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let nesd = Nesd::builder(&id, &w.broker, &w.keyserver)
            .args(&flags)
            .start()
            .await?;
        let log = wait_log(&nesd, "the TLS refusal in the log", |t| {
            t.contains("cannot connect to the broker")
        })
        .await?;
        ensure!(
            log.contains("UnknownIssuer"),
            "the log does not say why:\n{log}"
        );
        let s = status(&mut nesd.client().await?).await?;
        ensure!(
            !s.connected,
            "connected to a broker whose certificate nobody trusts ({flags:?})"
        );
        drop(nesd);
    }
    Ok(())
}

/// How often bob's nesd logged a new broker connection.
fn connections(nesd: &Nesd) -> Result<usize> {
    Ok(std::fs::read_to_string(nesd.log_path())?
        .matches("connected to the broker")
        .count())
}

/// carol (who may write to bob's topic) publishes 300 KiB, over the 256 KiB frame limit,
/// to bob, who speaks `protocol`; answers bob's nesd and client once the next normal
/// message from alice has arrived.
async fn oversized_to_bob(w: &SecureWorld, protocol: &str) -> Result<(Nesd, Nesd, Client)> {
    let flags = ["--broker-protocol", protocol];
    let (_alice_id, alice) = w.user_with("alice", &flags).await?;
    let (_bob_id, bob) = w.user_with("bob", &flags).await?;
    let mut a = alice.client().await?;
    let b = bob.client().await?;
    wait_connected(&a).await?;
    wait_connected(&b).await?;
    let s = status(&mut b.clone()).await?;
    ensure!(
        s.broker_protocol == protocol,
        "bob speaks {:?}",
        s.broker_protocol
    );

    let mut carol = w.raw("carol").await?;
    carol
        .client
        .publish(
            "nes/bob/message",
            QoS::AtLeastOnce,
            false,
            vec![b'{'; 300 * 1024],
        )
        .await?;
    carol
        .next("PUBACK", |p| matches!(p, Packet::PubAck(_)).then_some(()))
        .await?;

    // The next normal message still arrives, and nothing of carol's was stored.
    send(&mut a, "bob", "after the big one").await?;
    let got = received(&b, "alice", 1).await?;
    ensure!(got[0].text == "after the big one", "bob got {:?}", got[0]);
    ensure!(
        history(&mut b.clone(), "carol").await?.is_empty(),
        "carol's packet was stored"
    );
    Ok((alice, bob, a))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_publish_does_not_break_a_3_1_1_session() -> Result<()> {
    let w = SecureWorld::start().await?;
    let (_alice, bob, mut a) = oversized_to_bob(&w, "3.1.1").await?;
    let b = bob.client().await?;
    // MQTT 3.1.1: the cap refused the packet from its header, then one capless
    // connection read it once and acknowledged it away as too large (docs/BROKER.md).
    let log = std::fs::read_to_string(bob.log_path())?;
    ensure!(
        log.contains("over the frame-size limit"),
        "the cap did not refuse the packet:\n{log}"
    );
    let s = status(&mut b.clone()).await?;
    ensure!(
        s.refused.get("too_large").copied().unwrap_or(0) == 1,
        "refused: {:?}",
        s.refused
    );
    wait_connected(&b).await?;
    // And again: the session is not stuck on the big packet.
    send(&mut a, "bob", "and one more").await?;
    let got = received(&b, "alice", 2).await?;
    ensure!(got[1].text == "and one more", "bob got {:?}", got[1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_publish_never_reaches_a_v5_session() -> Result<()> {
    let w = SecureWorld::start().await?;
    let (_alice, bob, mut a) = oversized_to_bob(&w, "5").await?;
    let b = bob.client().await?;
    // MQTT 5: bob's CONNECT told the broker the packet cap, so mosquitto dropped the
    // packet for him; nesd never saw it: no refusal, no reconnect.
    let s = status(&mut b.clone()).await?;
    ensure!(
        s.refused.get("too_large").copied().unwrap_or(0) == 0,
        "refused: {:?}",
        s.refused
    );
    let log = std::fs::read_to_string(bob.log_path())?;
    ensure!(
        !log.contains("over the frame-size limit") && !log.contains("lost the broker connection"),
        "the packet reached nesd:\n{log}"
    );
    ensure!(connections(&bob)? == 1, "bob reconnected:\n{log}");
    send(&mut a, "bob", "and one more").await?;
    let got = received(&b, "alice", 2).await?;
    ensure!(got[1].text == "and one more", "bob got {:?}", got[1]);
    ensure!(connections(&bob)? == 1, "bob reconnected");
    Ok(())
}
