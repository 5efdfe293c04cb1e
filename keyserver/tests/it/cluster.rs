//! Several key servers on one PostgreSQL (the deployment that outgrows one machine):
//! what one server does, the others see, within the answer cache's TTL.

use crate::common::*;
use std::time::Duration;

#[tokio::test]
async fn two_servers_on_one_database_agree() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(Backend::Postgres, dir.path());
    let options = || {
        let mut o = Options::new(Backend::Postgres).args(&["--cache-ttl", "1s"]);
        o.database = Some(db.url.clone());
        o
    };
    let a = Server::start_with(options()).await;
    let b = Server::start_with(options()).await;

    let links = a.register_and_activate("carl").await;
    // Activation on A is visible on B at once (only found answers are cached).
    let (from_a, _) = a.lookup_verified("carl").await;
    let (from_b, _) = b.lookup_verified("carl").await;
    assert_eq!(from_a, from_b, "both serve the one stored answer");
    // A name registered through A is taken on B.
    let (m, s) = alice_keys();
    assert_error(
        b.post_users(registration("carl", "x@example.org", &m, &s))
            .await,
        409,
        "username_taken",
    )
    .await;

    // Deleted through A: A at once, B once its cached copy expires.
    assert_eq!(a.confirm_delete(&links.delete).await.status(), 200);
    assert_error(a.get("/users/carl").await, 404, "not_found").await;
    eventually("B forgets carl", Duration::from_secs(30), || async {
        Ok((b.get("/users/carl").await.status() == 404).then_some(()))
    })
    .await
    .unwrap();
}
