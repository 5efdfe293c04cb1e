//! The delete link of the activation mail (issue 14, item 6): a GET only asks for
//! confirmation, the confirmation form's POST deletes, activation stays one GET.
//!
//! The "mail scanner" is what security gateways and link previewers do with a mail: open
//! every link in it with GET (some with HEAD, some twice). It must leave the registration
//! active and its keys as registered.

use crate::common::*;
use crate::mail::SmtpServer;

crate::on_both_backends!(
    a_mail_scanner_leaves_the_registration_intact,
    only_a_post_with_the_delete_token_deletes,
);

/// Every `http://` or `https://` URL in `text`, as a scanner would find them.
fn every_link(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '<' || c == '>')
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

async fn a_mail_scanner_leaves_the_registration_intact(backend: Backend) {
    let smtp = SmtpServer::start();
    let mut options = Options::new(backend);
    options.mail = Mail::Smtp(format!("smtp://127.0.0.1:{}", smtp.port));
    let server = Server::start_with(options).await;
    server.register("sasha").await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "one mail delivered over SMTP");
    let links = parse_links(&mails[0]).expect("the contract lines");
    let found = every_link(&mails[0]);
    for link in [&links.activate, &links.delete, &links.api] {
        assert!(found.contains(link), "{link} not among {found:?}");
    }

    // The scanner: every link, GET twice and HEAD, in the order of the mail.
    for url in &found {
        for _ in 0..2 {
            let r = server.follow(url).await;
            assert!(r.status() != 500, "{url}: {}", r.status());
        }
        server.http.head(url).send().await.expect("HEAD");
    }

    // Activated (one click), not deleted: the keys are served as registered.
    let (_, answer) = server.lookup_verified("sasha").await;
    let (m, s) = alice_keys();
    assert_eq!((answer.public_key_message, answer.public_key_sign), (m, s));
    assert_eq!(server.metric("nes_keyserver_activations_total").await, 1.0);
    assert_eq!(server.metric("nes_keyserver_deletions_total").await, 0.0);

    // What the scanner saw at the delete link: a page with a form, no script.
    let r = server.follow(&links.delete).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        r.headers()
    );
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("form-action 'self'"));
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let page = r.text().await.unwrap();
    assert!(page.contains("<form method=\"post\">"), "{page}");
    assert!(
        !page.contains("action="),
        "the form posts to the page's own URL"
    );
    assert!(
        !page.contains("<script") && page.contains("sasha"),
        "{page}"
    );
    server.lookup_verified("sasha").await;

    // A person pressing the button: the browser POSTs the (empty) form to the same URL.
    let r = server
        .http
        .post(&links.delete)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("Deleted"));
    assert_error(server.get("/users/sasha").await, 404, "not_found").await;
    assert_eq!(server.metric("nes_keyserver_deletions_total").await, 1.0);
}

async fn only_a_post_with_the_delete_token_deletes(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("tomas").await;
    let links = server.links("tomas");
    // Pending: neither link deletes, the activation token is not for POST.
    assert_error(server.confirm_delete(&links.delete).await, 404, "not_found").await;
    assert_error(
        server.confirm_delete(&links.activate).await,
        404,
        "not_found",
    )
    .await;
    assert_error(server.follow(&links.delete).await, 404, "not_found").await;

    // A GET with the activation token still activates, as one click.
    let r = server.follow(&links.activate).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"username": "tomas", "status": "activated"})
    );
    server.lookup_verified("tomas").await;

    // Wrong tokens, the activation token, another user's token: 404, nothing deleted.
    let token = links.delete.rsplit('/').next().unwrap().to_string();
    server.register_and_activate("ursula").await;
    for path in [
        "/users/tomas/wrong".to_string(),
        format!("/users/tomas/{token}x"),
        format!("/users/tomas/{}", &token[1..]),
        format!("/users/ursula/{token}"),
        format!("/users/nobody/{token}"),
        "/users/x/abc".to_string(),
    ] {
        let r = server.confirm_delete(&server.url(&path)).await;
        assert_error(r, 404, "not_found").await;
    }
    assert_error(
        server.confirm_delete(&links.activate).await,
        404,
        "not_found",
    )
    .await;
    server.lookup_verified("tomas").await;
    server.lookup_verified("ursula").await;
    assert_eq!(server.metric("nes_keyserver_deletions_total").await, 0.0);

    // The delete token, POSTed: deleted, answered in JSON to an API client.
    let r = server.confirm_delete(&links.delete).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"username": "tomas", "status": "deleted"})
    );
    assert_error(server.get("/users/tomas").await, 404, "not_found").await;
    // Once only; the other user is untouched.
    assert_error(server.confirm_delete(&links.delete).await, 404, "not_found").await;
    server.lookup_verified("ursula").await;
    assert_eq!(server.metric("nes_keyserver_deletions_total").await, 1.0);
}
