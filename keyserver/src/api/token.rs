//! `GET` and `POST /users/{username}/{token}`: the links in the activation mail.
//!
//! | method | token | user | answer |
//! |---|---|---|---|
//! | GET | activation | pending, in time | 200 `{"username","status":"activated"}`: the answer is signed and stored |
//! | GET | activation | pending, expired | 410 `token_expired` (until the cleanup task removes the row; then 404) |
//! | GET | delete | active | 200 `text/html`: a page asking to confirm, with a form that POSTs to the same URL; nothing changes |
//! | POST | delete | active | 200 `{"username","status":"deleted"}` (a `text/html` page when the client accepts HTML, e.g. the form) |
//! | any | anything else | | 404 `not_found` |
//! | any | | | 429 `rate_limited` (the lookup limit, with `Retry-After`) |
//!
//! Activation stays one click (a GET), but deletion takes a POST: mail scanners and link
//! previewers open every link of a mail with GET (and follow no forms), so a GET that
//! deleted would undo the registration it had just activated. The confirmation page is
//! plain HTML, no script; its form has no `action`, so it posts to the URL it was loaded
//! from, and the token is not reflected into the page.
//!
//! The presented token is hashed and compared with the stored hash in constant time
//! ([`crate::tokens::TokenHash::matches`]). The store's update is conditional on the
//! state read here, so two clicks racing each other do one thing once.

use super::{reply, ApiError, AppState, ClientIp};
use crate::ratelimit::Limit;
use crate::store::UserState;
use crate::tokens::TokenHash;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nes_proto::{build_answer, Username};

/// The handler of `GET /users/{username}/{token}`: activates, or shows the delete
/// confirmation page.
pub async fn token(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let result = follow(&state, client, path).await;
    reply(&state, result)
}

/// The handler of `POST /users/{username}/{token}`: deletes for a delete token. The body,
/// if any (the confirmation form sends an empty one), is ignored.
pub async fn delete(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let result = confirm_delete(&state, client, path, wants_html(&headers)).await;
    reply(&state, result)
}

fn no_such() -> ApiError {
    ApiError::not_found("no such user or token")
}

/// The rate limit, the path, and the user it names, with the presented token's hash.
async fn read(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(Username, TokenHash, UserState), ApiError> {
    state
        .limits
        .check(Limit::Lookup, client)
        .map_err(ApiError::rate_limited)?;
    let Ok(Path((name, token))) = path else {
        return Err(no_such());
    };
    let username = Username::parse(&name).map_err(|_| no_such())?;
    let presented = TokenHash::of(&token);
    let user = state
        .store
        .user(&username)
        .await
        .map_err(|e| ApiError::internal("user read failed in the store", &e))?;
    let user = user.ok_or_else(no_such)?;
    Ok((username, presented, user))
}

async fn follow(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (username, presented, user) = read(state, client, path).await?;
    match user {
        UserState::Pending {
            activation_hash,
            expires_ms,
            public_key_message,
            public_key_sign,
        } => {
            if !presented.matches(&activation_hash) {
                return Err(no_such());
            }
            let now = crate::now_ms();
            if now >= expires_ms {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "token_expired",
                    format!("the activation link of {username} has expired; register again"),
                ));
            }
            // The one RSA private operation of the server, off the async workers.
            let key = state.key.clone();
            let name = username.clone();
            let answer = tokio::task::spawn_blocking(move || {
                build_answer(&key, &name, &public_key_message, &public_key_sign)
            })
            .await
            .map_err(|e| ApiError::internal("signing task failed", &e))?
            .map_err(|e| ApiError::internal("signing the answer failed", &e))?;
            let activated = state
                .store
                .activate(&username, &activation_hash, &answer, now)
                .await
                .map_err(|e| ApiError::internal("activation failed in the store", &e))?;
            if !activated {
                return Err(no_such());
            }
            state.cache.remove(username.as_str());
            state.metrics.activated();
            tracing::info!(%username, "activated");
            Ok(done(&username, "activated"))
        }
        UserState::Active { delete_hash } => {
            if !presented.matches(&delete_hash) {
                return Err(no_such());
            }
            Ok(html(&confirmation_page(&username)))
        }
    }
}

async fn confirm_delete(
    state: &AppState,
    client: std::net::IpAddr,
    path: Result<Path<(String, String)>, PathRejection>,
    as_html: bool,
) -> Result<Response, ApiError> {
    let (username, presented, user) = read(state, client, path).await?;
    // Only the delete token of an active user: an activation token is for GET.
    let UserState::Active { delete_hash } = user else {
        return Err(no_such());
    };
    if !presented.matches(&delete_hash) {
        return Err(no_such());
    }
    let deleted = state
        .store
        .delete(&username, &delete_hash)
        .await
        .map_err(|e| ApiError::internal("deletion failed in the store", &e))?;
    if !deleted {
        return Err(no_such());
    }
    state.cache.remove(username.as_str());
    state.metrics.deleted();
    tracing::info!(%username, "deleted");
    if as_html {
        Ok(html(&deleted_page(&username)))
    } else {
        Ok(done(&username, "deleted"))
    }
}

fn done(username: &Username, status: &str) -> Response {
    (
        StatusCode::OK,
        Json(serde_json::json!({ "username": username.as_str(), "status": status })),
    )
        .into_response()
}

/// A browser's form submission asks for HTML; API clients get JSON.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"))
}

/// A 200 HTML page that loads nothing, runs nothing, cannot be framed, is not cached and
/// sends no Referer (its URL holds the token).
fn html(page: &str) -> Response {
    let mut response = (StatusCode::OK, page.to_owned()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{title}</title>\n\
         <style>body{{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em}}</style>\n\
         </head>\n<body>\n{body}</body>\n</html>\n"
    )
}

/// The page a GET on a delete link shows: nothing is deleted until its button is pressed.
fn confirmation_page(username: &Username) -> String {
    let name = escape(username.as_str());
    page(
        &format!("Delete the NES username {name}?"),
        &format!(
            "<h1>Delete the NES username &quot;{name}&quot;?</h1>\n\
             <p>This removes the username and its public keys from this key server. Nobody \
             will find your keys under it any more, and anyone can register the name again.</p>\n\
             <form method=\"post\">\n<button type=\"submit\">Delete {name}</button>\n</form>\n\
             <p>To keep it, close this page: nothing has changed.</p>\n"
        ),
    )
}

fn deleted_page(username: &Username) -> String {
    let name = escape(username.as_str());
    page(
        &format!("NES username {name} deleted"),
        &format!(
            "<h1>Deleted</h1>\n<p>The NES username &quot;{name}&quot; and its public keys \
             are removed from this key server.</p>\n"
        ),
    )
}

/// HTML text escaping. Usernames are `[a-z0-9_-]` already; this keeps the page safe should
/// that rule ever widen.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_confirmation_page_is_a_script_free_form_posting_back() {
        let page = confirmation_page(&Username::parse("alice").unwrap());
        assert!(page.contains("<form method=\"post\">"), "{page}");
        assert!(!page.contains("action="), "posts to its own URL");
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("Delete alice"));
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn only_html_accepting_clients_get_html() {
        let mut headers = HeaderMap::new();
        assert!(!wants_html(&headers));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_html(&headers));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"),
        );
        assert!(wants_html(&headers));
    }
}
