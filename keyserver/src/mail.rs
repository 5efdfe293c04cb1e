//! The activation mail, and the three ways it can leave: SMTP (`--smtp URL`), an `.eml`
//! file per mail (`--mail-dir DIR`), or a log line (`--dev`).
//!
//! Contract other parts of NES rely on: the body is plain text, sent with
//! `Content-Transfer-Encoding: 7bit` (so no quoted-printable soft breaks split the
//! links), and contains the lines
//!
//! ```text
//! Activate: <public-url>/users/<name>/<activation-token>
//! Delete: <public-url>/users/<name>/<delete-token>
//! ```
//!
//! plus the API link `<public-url>/users/<name>` where the signed keys appear. Opening
//! the Delete link only shows a confirmation page whose form's POST deletes, so a mail
//! scanner that opens every link deletes nothing (`api/token.rs`).

use crate::config::MailConfig;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox};
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{Address, AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// How long one SMTP exchange may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why mail could not be set up or sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailError {
    /// `--smtp` is not a usable URL.
    #[error("--smtp {url}: {reason}; use smtp://HOST:PORT, smtp://HOST:PORT?tls=required or smtps://HOST:PORT")]
    SmtpUrl {
        /// The URL, password removed.
        url: String,
        /// Why.
        reason: String,
    },
    /// `--mail-dir` cannot be created.
    #[error("--mail-dir {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `--mail-from` is not a mailbox.
    #[error("--mail-from {0:?} is not a mailbox: use e.g. \"NES key server <keys@example.org>\"")]
    From(String),
    /// The recipient or the body could not be made into a mail.
    #[error("cannot build the mail: {0}")]
    Build(String),
    /// The transport refused it.
    #[error("cannot send the mail: {0}")]
    Send(String),
}

/// Where mail goes.
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Dir(AsyncFileTransport<Tokio1Executor>),
    Dev,
}

/// Sends activation mail.
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    description: String,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("to", &self.description)
            .field("from", &self.from.to_string())
            .finish()
    }
}

/// The links of one activation mail.
#[derive(Debug, Clone)]
pub struct ActivationMail<'a> {
    /// The registered address.
    pub to: &'a str,
    /// The registered name.
    pub username: &'a str,
    /// `<public-url>/users/<name>/<activation token>`.
    pub activate_url: &'a str,
    /// `<public-url>/users/<name>/<delete token>`.
    pub delete_url: &'a str,
    /// `<public-url>/users/<name>`.
    pub api_url: &'a str,
    /// How long the activation link works.
    pub ttl: Duration,
}

impl Mailer {
    /// Sets up the transport of `config`; `from` is the From: mailbox (default: `NES
    /// key server <noreply@HOST>` with the host of `public_url`). Call it inside the
    /// Tokio runtime: the SMTP connection pool runs a task there.
    pub fn new(
        config: &MailConfig,
        from: Option<&str>,
        public_url: &str,
    ) -> Result<Self, MailError> {
        let from = match from {
            Some(text) => text
                .parse::<Mailbox>()
                .map_err(|_| MailError::From(text.to_string()))?,
            None => default_from(public_url)?,
        };
        let (transport, description) = match config {
            MailConfig::Smtp(url) => {
                let redacted = crate::store::redact(url);
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| MailError::SmtpUrl {
                        url: redacted.clone(),
                        reason: e.to_string(),
                    })?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build();
                (Transport::Smtp(transport), format!("SMTP {redacted}"))
            }
            MailConfig::Dir(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| MailError::Dir {
                    path: dir.display().to_string(),
                    source,
                })?;
                (
                    Transport::Dir(AsyncFileTransport::new(dir)),
                    format!("files in {}", dir.display()),
                )
            }
            MailConfig::Dev => (Transport::Dev, "the log (--dev)".to_string()),
        };
        Ok(Self {
            transport,
            from,
            description,
        })
    }

    /// Where mail goes, for the startup log.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// For SMTP: whether the server answers (a startup warning, not a refusal: mail is
    /// only needed for registrations, lookups work without it).
    pub async fn check(&self) -> Result<(), MailError> {
        match &self.transport {
            Transport::Smtp(smtp) => match smtp.test_connection().await {
                Ok(true) => Ok(()),
                Ok(false) => Err(MailError::Send(
                    "the SMTP server did not answer NOOP".into(),
                )),
                Err(e) => Err(MailError::Send(e.to_string())),
            },
            Transport::Dir(_) | Transport::Dev => Ok(()),
        }
    }

    /// Sends the activation mail.
    pub async fn send_activation(&self, mail: &ActivationMail<'_>) -> Result<(), MailError> {
        if let Transport::Dev = self.transport {
            tracing::info!(
                username = mail.username,
                "--dev: no mail sent; the links follow"
            );
            tracing::info!("Activate: {}", mail.activate_url);
            tracing::info!("Delete: {}", mail.delete_url);
            return Ok(());
        }
        let message = self.build(mail)?;
        match &self.transport {
            Transport::Smtp(smtp) => smtp
                .send(message)
                .await
                .map(drop)
                .map_err(|e| MailError::Send(e.to_string())),
            Transport::Dir(dir) => dir
                .send(message)
                .await
                .map(drop)
                .map_err(|e| MailError::Send(e.to_string())),
            Transport::Dev => Ok(()),
        }
    }

    fn build(&self, mail: &ActivationMail<'_>) -> Result<Message, MailError> {
        let to: Address = mail
            .to
            .parse()
            .map_err(|e: lettre::address::AddressError| MailError::Build(e.to_string()))?;
        let body = seven_bit(activation_text(mail))?;
        Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to))
            .subject(format!("Activate the NES username {}", mail.username))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| MailError::Build(e.to_string()))
    }
}

/// `text` as a `7bit` body. lettre would pick quoted-printable for lines over 76
/// characters, which breaks long links with soft line breaks; RFC 5322 allows 998, so we
/// check the 7bit rules ourselves (ASCII, no NUL, CRLF line ends, lines under 998) and
/// hand the text over as it is.
fn seven_bit(text: String) -> Result<Body, MailError> {
    let lines_ok = text
        .split("\r\n")
        .all(|line| line.len() < 998 && !line.contains(['\r', '\n']));
    if !text.is_ascii() || text.contains('\0') || !lines_ok {
        return Err(MailError::Build(
            "the body is not 7-bit text with short lines".into(),
        ));
    }
    Ok(Body::dangerous_pre_encoded(
        text.into_bytes(),
        ContentTransferEncoding::SevenBit,
    ))
}

/// The plain-text body of the activation mail (ASCII, short lines).
pub fn activation_text(mail: &ActivationMail<'_>) -> String {
    let within = human_duration(mail.ttl);
    format!(
        "Hello,\r\n\
         \r\n\
         someone, hopefully you, registered the NES username \"{name}\" with this\r\n\
         e-mail address. To publish its public keys, open the activation link\r\n\
         within {within}:\r\n\
         \r\n\
         Activate: {activate}\r\n\
         \r\n\
         Keep this mail: the delete link removes the username and its keys from\r\n\
         the key server, now or at any time later. It opens a page that asks\r\n\
         you to confirm; nothing is deleted until you press its button.\r\n\
         \r\n\
         Delete: {delete}\r\n\
         \r\n\
         Once activated, the signed keys are at\r\n\
         \r\n\
         API: {api}\r\n\
         \r\n\
         If you did not register, ignore this mail: without activation the\r\n\
         registration is removed after {within}.\r\n",
        name = mail.username,
        activate = mail.activate_url,
        delete = mail.delete_url,
        api = mail.api_url,
    )
}

/// `24 hours`, `2 seconds`, ...: the largest unit that divides the duration.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    let (n, unit) = [
        (86_400, "day"),
        (3_600, "hour"),
        (60, "minute"),
        (1, "second"),
    ]
    .into_iter()
    .find(|(size, _)| secs % size == 0 && secs >= *size)
    .map_or((secs, "second"), |(size, unit)| (secs / size, unit));
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn default_from(public_url: &str) -> Result<Mailbox, MailError> {
    let host = url::Url::parse(public_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string));
    let address = match host.and_then(|h| Address::new("noreply", h).ok()) {
        Some(address) => address,
        None => Address::new("noreply", "localhost").map_err(|e| MailError::From(e.to_string()))?,
    };
    Ok(Mailbox::new(Some("NES key server".into()), address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ActivationMail<'static> {
        ActivationMail {
            to: "alice@example.org",
            username: "alice",
            activate_url: "http://k.example.org/users/alice/AAAA",
            delete_url: "http://k.example.org/users/alice/BBBB",
            api_url: "http://k.example.org/users/alice",
            ttl: Duration::from_secs(86400),
        }
    }

    #[test]
    fn the_body_holds_the_contract_lines() {
        let text = activation_text(&sample());
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert!(lines.contains(&"Activate: http://k.example.org/users/alice/AAAA"));
        assert!(lines.contains(&"Delete: http://k.example.org/users/alice/BBBB"));
        assert!(lines.contains(&"API: http://k.example.org/users/alice"));
        assert!(text.contains("within 1 day"), "{text}");
        assert!(text.contains("asks\r\nyou to confirm"), "{text}");
        assert_eq!(human_duration(Duration::from_secs(7200)), "2 hours");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 seconds");
        assert_eq!(human_duration(Duration::from_secs(60)), "1 minute");
        assert!(text.is_ascii() && lines.iter().all(|l| l.len() < 998));
        assert!(seven_bit(text).is_ok());
        assert!(seven_bit("caf\u{e9}".into()).is_err());
        assert!(seven_bit("a\nb".into()).is_err(), "bare LF");
        assert!(seven_bit("x".repeat(1000)).is_err());
    }

    #[tokio::test]
    async fn files_are_7bit_with_unwrapped_links() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(
            &MailConfig::Dir(dir.path().into()),
            None,
            "http://k.example.org",
        )
        .unwrap();
        let long = format!("http://k.example.org/users/alice/{}", "A".repeat(43));
        let mail = ActivationMail {
            activate_url: &long,
            ..sample()
        };
        mailer.send_activation(&mail).await.unwrap();
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(entry.path().extension().unwrap(), "eml");
        let raw = std::fs::read_to_string(entry.path()).unwrap();
        assert!(raw.contains("Content-Transfer-Encoding: 7bit"), "{raw}");
        assert!(raw.contains(&format!("\r\nActivate: {long}\r\n")), "{raw}");
        assert!(
            raw.contains("From: \"NES key server\" <noreply@k.example.org>"),
            "{raw}"
        );
        assert!(raw.contains("To: alice@example.org"), "{raw}");
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        assert!(matches!(
            Mailer::new(&MailConfig::Smtp("smtp://".into()), None, "http://h"),
            Err(MailError::SmtpUrl { .. })
        ));
        assert!(matches!(
            Mailer::new(&MailConfig::Dev, Some("not a mailbox"), "http://h"),
            Err(MailError::From(_))
        ));
        let ok = Mailer::new(
            &MailConfig::Smtp("smtp://127.0.0.1:2525".into()),
            Some("K <k@example.org>"),
            "http://h",
        );
        assert!(ok.is_ok());
    }
}
