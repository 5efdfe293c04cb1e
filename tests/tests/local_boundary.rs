//! The local boundary: other Unix users cannot reach the daemon or its keys, and private
//! keys never leave nesd through its log, the gRPC API or the D-Bus API.
//!
//! Issue 7. The second user is `nes-other`, created with `useradd` when missing (the
//! test needs root for that and to run commands under another uid; CI runs as root).
//! Commands run as that user through `std::os::unix::process::CommandExt::uid/gid`.

use anyhow::{bail, ensure, Context, Result};
use nes_e2e::frontends::SessionBus;
use nes_e2e::*;
use nes_proto::rpc;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const OTHER: &str = "nes-other";

/// The uid and gid of the second user, created when missing.
fn other_user() -> Result<(u32, u32)> {
    let lookup = || -> Result<Option<(u32, u32)>> {
        let id = |flag: &str| -> Result<Option<u32>> {
            let out = Command::new("id")
                .arg(flag)
                .arg(OTHER)
                .stderr(Stdio::null())
                .output()?;
            Ok(if out.status.success() {
                Some(String::from_utf8_lossy(&out.stdout).trim().parse()?)
            } else {
                None
            })
        };
        Ok(id("-u")?.zip(id("-g")?))
    };
    if let Some(ids) = lookup()? {
        return Ok(ids);
    }
    // Another test may create it at the same moment: look again whatever useradd says.
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            OTHER,
        ])
        .output()
        .context("cannot run useradd (this test needs root to create the user nes-other)")?;
    lookup()?.with_context(|| {
        format!(
            "cannot create the user {OTHER} (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Runs `program args` as the second user.
fn as_other(ids: (u32, u32), program: &Path, args: &[&std::ffi::OsStr]) -> Result<Output> {
    Ok(Command::new(program)
        .args(args)
        .uid(ids.0)
        .gid(ids.1)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .mode()
        & 0o777)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// The other user can neither connect to the socket nor read key files, and can't when
/// the directories above them are opened up either (the socket and files are 0600).
fn refused_to_other(ids: (u32, u32), socket: &Path, key: &Path, data_dir: &Path) -> Result<()> {
    let nes = bin("nes")?;
    let out = as_other(
        ids,
        &nes,
        &["--socket".as_ref(), socket.as_os_str(), "status".as_ref()],
    )?;
    ensure!(
        !out.status.success(),
        "another user got a status from the daemon: {}",
        text(&out)
    );
    ensure!(
        text(&out).to_lowercase().contains("permission denied"),
        "`nes status` as another user failed for another reason (code {:?}): {}",
        out.status.code(),
        text(&out)
    );
    let out = as_other(ids, Path::new("/bin/cat"), &[key.as_os_str()])?;
    ensure!(
        !out.status.success() && out.stdout.is_empty(),
        "another user read {}",
        key.display()
    );
    ensure!(
        text(&out).contains("Permission denied"),
        "cat failed for another reason: {}",
        text(&out)
    );
    let out = as_other(
        ids,
        Path::new("/bin/cat"),
        &[key.with_extension("pub").as_os_str()],
    )?;
    let _ = out; // public keys may be readable; nothing to assert
    let out = as_other(
        ids,
        Path::new("/bin/ls"),
        &[data_dir.join("keys").as_os_str()],
    )?;
    ensure!(
        !out.status.success(),
        "another user listed the key dir: {}",
        text(&out)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_connect_to_the_socket_or_read_the_keys() -> Result<()> {
    let ids = other_user()?;
    let w = World::start().await?;
    let (alice_id, alice) = w.user("alice").await?;
    let socket = alice.socket();
    let data = alice_id.data_dir();
    let key = data.join("keys").join("alice-rsa-message");
    let sign_key = data.join("keys").join("alice-rsa-sign");

    // The modes the design asks for.
    ensure!(mode(&socket)? == 0o600, "socket mode {:o}", mode(&socket)?);
    let socket_dir = socket.parent().context("socket without a dir")?;
    ensure!(
        mode(socket_dir)? == 0o700,
        "socket dir mode {:o}",
        mode(socket_dir)?
    );
    ensure!(mode(data)? == 0o700, "data dir mode {:o}", mode(data)?);
    ensure!(
        mode(&data.join("keys"))? == 0o700,
        "key dir mode {:o}",
        mode(&data.join("keys"))?
    );
    for k in [&key, &sign_key] {
        ensure!(mode(k)? == 0o600, "{} mode {:o}", k.display(), mode(k)?);
    }
    // And the owner (root here) gets in, so the refusals below are about the other user.
    status(&mut alice.client().await?).await?;

    refused_to_other(ids, &socket, &key, data)?;

    // Open every directory on the way (as a careless admin might): the socket and the key
    // files refuse on their own.
    let mut dir = socket_dir.to_path_buf();
    while dir != Path::new("/tmp") && dir != Path::new("/") {
        if mode(&dir)? & 0o005 != 0o005 {
            chmod(&dir, 0o755)?;
        }
        dir = dir.parent().context("no parent")?.to_path_buf();
    }
    chmod(data, 0o755)?;
    let out = as_other(ids, Path::new("/bin/ls"), &[data.as_os_str()])?;
    ensure!(
        out.status.success(),
        "the data dir was not opened up: {}",
        text(&out)
    );
    let out = as_other(
        ids,
        &bin("nes")?,
        &["--socket".as_ref(), socket.as_os_str(), "status".as_ref()],
    )?;
    ensure!(
        !out.status.success(),
        "another user got a status through an opened dir: {}",
        text(&out)
    );
    ensure!(
        text(&out).to_lowercase().contains("permission denied"),
        "{}",
        text(&out)
    );
    for k in [&key, &sign_key] {
        let out = as_other(ids, Path::new("/bin/cat"), &[k.as_os_str()])?;
        ensure!(
            !out.status.success() && out.stdout.is_empty(),
            "another user read {}",
            k.display()
        );
    }
    chmod(data, 0o700)?;
    Ok(())
}

/// A few base64 lines from the middle of each private key's PEM: if any of them shows
/// up somewhere, a private key leaked.
fn needles(id: &Identity) -> Vec<String> {
    let mut all = Vec::new();
    for pem in [id.message.to_pkcs1_pem(), id.sign.to_pkcs1_pem()] {
        let lines: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mid = lines.len() / 2;
        all.extend(lines[mid - 2..mid + 2].iter().map(|l| l.to_string()));
        // A line also leaks when printed without line breaks or JSON-escaped: its first
        // 40 characters are enough to find it.
        all.extend(lines[mid - 2..mid + 2].iter().map(|l| l[..40].to_string()));
    }
    all
}

async fn busctl(bus: &SessionBus, args: &[&str]) -> Result<String> {
    let out = bus
        .command("busctl")
        .arg("--user")
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!("busctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_never_appear_in_the_log_the_grpc_api_or_d_bus() -> Result<()> {
    let w = World::start().await?;
    let bus = SessionBus::start().await?;
    let alice_id = Identity::generate("alice")?;
    alice_id.register(&w.keyserver).await?;
    let (bob_id, bob) = w.user("bob").await?;
    // The most talkative log there is.
    let alice = Nesd::builder(&alice_id, &w.broker, &w.keyserver)
        .session_bus(&bus)
        .env("NES_LOG", "trace")
        .start()
        .await?;
    bus.wait_for_name("org.nes.Messenger1").await?;
    let mut a = connect(&alice.socket()).await?;
    let mut b = bob.client().await?;

    // Use everything once.
    let mut seen = String::new();
    let secret_text = "a message that must show up in the outputs we grep";
    seen += &format!("{:?}\n", send(&mut a, "bob", secret_text).await?);
    wait_history(&b, "alice", 1, |m| m.text == secret_text).await?;
    send(&mut b, "alice", "a reply").await?;
    seen += &format!("{:?}\n", wait_history(&a, "bob", 2, |_| true).await?);
    seen += &format!("{:?}\n", status(&mut a).await?);
    seen += &format!(
        "{:?}\n",
        a.contacts(rpc::ContactsRequest {}).await?.into_inner()
    );
    for user in ["bob", "alice"] {
        let c = a
            .lookup_contact(rpc::LookupContactRequest {
                username: user.into(),
                refresh: true,
            })
            .await?;
        seen += &format!("{:?}\n", c.into_inner());
    }
    seen += &format!(
        "{:?}\n",
        a.conversations(rpc::ConversationsRequest {})
            .await?
            .into_inner()
    );
    seen += &format!(
        "{:?}\n",
        a.set_contact_legacy(rpc::SetContactLegacyRequest {
            username: "bob".into(),
            legacy: false
        })
        .await?
        .into_inner()
    );
    seen += &format!(
        "{:?}\n",
        a.register(rpc::RegisterRequest {
            email: "alice@example.test".into()
        })
        .await
    );
    seen += &format!(
        "{:?}\n",
        a.trust_contact(rpc::TrustContactRequest {
            username: "bob".into(),
            ..Default::default()
        })
        .await
    );
    let last = status(&mut a).await?.last_cursor;
    let mut events = EventStream::open(&a, Some(0)).await?;
    loop {
        let e = events
            .next_matching("the logged events", |e| Some(e.clone()))
            .await?;
        seen += &format!("{e:?}\n");
        if e.cursor >= last {
            break;
        }
    }
    // D-Bus: properties, methods, introspection.
    const DEST: &str = "org.nes.Messenger1";
    const PATH: &str = "/org/nes/Messenger1";
    for args in [
        vec!["introspect", DEST, PATH],
        vec![
            "get-property",
            DEST,
            PATH,
            DEST,
            "User",
            "Connected",
            "Unread",
        ],
        vec!["call", DEST, PATH, DEST, "ListConversations"],
        vec!["call", DEST, PATH, DEST, "History", "su", "bob", "0"],
        vec!["call", DEST, PATH, DEST, "Send", "ss", "bob", "over d-bus"],
        vec![
            "call",
            DEST,
            PATH,
            "org.freedesktop.DBus.Properties",
            "GetAll",
            "s",
            DEST,
        ],
    ] {
        seen += &busctl(&bus, &args).await?;
    }
    wait_history(&b, "alice", 2, |_| true).await?;
    let log = alice.log();

    ensure!(
        seen.contains(secret_text),
        "the API outputs were not captured"
    );
    ensure!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is not verbose: {log}"
    );
    for (what, haystack) in [
        ("gRPC and D-Bus answers", &seen),
        ("alice's nesd log", &log),
        ("bob's nesd log", &std::fs::read_to_string(bob.log_path())?),
    ] {
        ensure!(
            !haystack.contains("PRIVATE KEY"),
            "a private key marker in {what}"
        );
        for id in [&alice_id, &bob_id] {
            for needle in needles(id) {
                ensure!(
                    !haystack.contains(&needle),
                    "a line of {}'s private key in {what}",
                    id.user
                );
            }
        }
    }
    Ok(())
}

/// Runs `nes ARGS` as this user (the victim) with nothing of the test's environment but
/// a fresh HOME and a runtime dir of its own, so only the socket given is tried.
fn nes_as_me(
    home: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<Output> {
    let mut cmd = Command::new(bin("nes")?);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn chown(path: &Path, ids: (u32, u32)) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(ids.0), Some(ids.1))
        .with_context(|| format!("chown {}", path.display()))
}

/// `nes status` and `nes send` through `socket` exit 1, name the path and say `why`.
fn refused(home: &Path, socket: &Path, why: &str) -> Result<()> {
    for args in [vec!["status"], vec!["send", "bob", "a secret for bob"]] {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--socket".as_ref(), socket.as_os_str()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let out = nes_as_me(home, &all, &[])?;
        let said = text(&out);
        ensure!(
            out.status.code() == Some(1),
            "`nes {args:?}` exited {:?}: {said}",
            out.status.code()
        );
        ensure!(
            said.contains(&format!("refusing nesd's socket {}", socket.display())),
            "{said}"
        );
        ensure!(said.contains(why), "expected {why:?} in: {said}");
    }
    Ok(())
}

/// A fake nesd: a listener that another user could have put there. Nothing may ever
/// connect to it.
fn assert_untouched(listener: &std::os::unix::net::UnixListener) -> Result<()> {
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok(_) => bail!("the CLI connected to the fake daemon"),
        Err(e) => bail!("accept: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_or_folder_of_another_user_is_refused_before_connecting() -> Result<()> {
    let ids = other_user()?;
    let other = format!("{OTHER} (uid {})", ids.0);
    let home = tempfile::tempdir()?;
    let root = tempfile::Builder::new().prefix("nes-boundary-").tempdir()?;
    chmod(root.path(), 0o755)?;

    // The `/tmp/nes-<uid>` fallback, made by the other user before us, with a listener.
    let me = std::fs::metadata("/proc/self")?.uid();
    let folder = root.path().join(format!("nes-{me}"));
    std::fs::create_dir(&folder)?;
    let socket = folder.join("nesd.sock");
    let fake = std::os::unix::net::UnixListener::bind(&socket)?;
    fake.set_nonblocking(true)?;
    chmod(&socket, 0o666)?;
    chown(&socket, ids)?;
    chown(&folder, ids)?;
    chmod(&folder, 0o755)?;
    refused(
        home.path(),
        &socket,
        &format!(
            "its folder {} belongs to {other}, not to you",
            folder.display()
        ),
    )?;
    // Found by the fallback itself (no --socket, no XDG_RUNTIME_DIR), where it applies.
    if !Path::new(&format!("/run/user/{me}")).exists() {
        let mut cmd = Command::new(bin("nes")?);
        cmd.arg("status")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config"))
            .env("TMPDIR", root.path())
            .stdin(Stdio::null());
        let out = cmd.output()?;
        ensure!(
            out.status.code() == Some(1),
            "fallback: exit {:?}: {}",
            out.status.code(),
            text(&out)
        );
        ensure!(
            text(&out).contains(&format!("refusing nesd's socket {}", socket.display())),
            "{}",
            text(&out)
        );
    }

    // Our folder, their socket.
    chown(&folder, (me, 0))?;
    chmod(&folder, 0o700)?;
    refused(
        home.path(),
        &socket,
        &format!("it belongs to {other}, not to you"),
    )?;

    // Our socket in a folder anyone may write to.
    chown(&socket, (me, 0))?;
    chmod(&folder, 0o777)?;
    refused(
        home.path(),
        &socket,
        "writable by its group and every user (mode 0777)",
    )?;
    chmod(&folder, 0o1777)?;
    refused(home.path(), &socket, "(mode 1777)")?;
    assert_untouched(&fake)?;

    drop(fake);

    // A listener run by the other user behind a socket file that looks like ours (the
    // files swapped after the check): refused by the peer's credentials, nothing sent.
    std::fs::remove_file(&socket)?;
    chown(&folder, ids)?;
    let log_dir = root.path().join("log");
    std::fs::create_dir(&log_dir)?;
    chown(&log_dir, ids)?;
    let log = log_dir.join("fake.log");
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_UNIX)\ns.bind({sock:?})\ns.listen(8)\nopen({log:?},'w').write('listening\\n')\n\
         while True:\n    c,_=s.accept()\n    n=0\n    while True:\n        d=c.recv(4096)\n        if not d: break\n        n+=len(d)\n    open({log:?},'a').write('conn %d\\n' % n)\n    c.close()\n",
        sock = socket.display().to_string(),
        log = log.display().to_string(),
    );
    let mut python = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .uid(ids.0)
        .gid(ids.1)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start python3")?;
    let result = async {
        eventually("the fake listener", TIMEOUT, || async {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening")
                .then_some(()))
        })
        .await?;
        // Make the socket and folder look like ours again.
        chown(&socket, (me, 0))?;
        chown(&folder, (me, 0))?;
        chmod(&folder, 0o700)?;
        let out = nes_as_me(
            home.path(),
            &[
                "--socket".as_ref(),
                socket.as_os_str(),
                "send".as_ref(),
                "bob".as_ref(),
                "secret".as_ref(),
            ],
            &[],
        )?;
        let said = text(&out);
        ensure!(
            out.status.code() == Some(1),
            "exit {:?}: {said}",
            out.status.code()
        );
        ensure!(
            said.contains(&format!("refusing nesd's socket {}", socket.display())),
            "{said}"
        );
        ensure!(
            said.contains(&format!("the program listening on it runs as {other}")),
            "{said}"
        );
        // The kernel completed the connection before the CLI looked at the peer; the
        // fake sees it closed with nothing read.
        let logged = eventually("the fake to log the connection", TIMEOUT, || async {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(t.contains("conn").then_some(t))
        })
        .await?;
        ensure!(
            logged
                .lines()
                .filter(|l| l.starts_with("conn"))
                .all(|l| l == "conn 0"),
            "bytes reached the fake: {logged}"
        );
        Ok(())
    }
    .await;
    let _ = python.kill();
    let _ = python.wait();
    result
}
