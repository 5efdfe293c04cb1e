//! Per-IP rate limits on registration (`--register-rate`, per minute), on lookups, link
//! clicks and prekey fetches (`--lookup-rate`, per second) and on prekey uploads
//! (`--prekey-rate`, per minute); 0 turns a limit off.
//!
//! Token buckets (GCRA, the `governor` crate) keyed by client address: a client may
//! burst up to the rate, then gets one request per 1/rate. IPv6 clients are keyed by
//! their /64, since one host usually holds a whole /64 and could otherwise rotate
//! through it. The refusal carries how long to wait, which becomes `Retry-After`.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

/// Which limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `POST /users`.
    Register,
    /// `GET /users/<name>`, `GET /users/<name>/<token>` and `GET /users/<name>/prekey`.
    Lookup,
    /// `PUT /users/<name>/prekey`.
    Prekey,
}

/// The limiters of one server.
pub struct Limits {
    register: Option<DefaultKeyedRateLimiter<IpAddr>>,
    lookup: Option<DefaultKeyedRateLimiter<IpAddr>>,
    prekey: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("register", &self.register.is_some())
            .field("lookup", &self.lookup.is_some())
            .field("prekey", &self.prekey.is_some())
            .finish()
    }
}

impl Limits {
    /// `register_per_minute` and `lookup_per_second` per client; 0 = unlimited. Prekey
    /// uploads are unlimited until [`Limits::with_prekey`] says otherwise.
    pub fn new(register_per_minute: u32, lookup_per_second: u32) -> Self {
        Self {
            register: NonZeroU32::new(register_per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            lookup: NonZeroU32::new(lookup_per_second)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            prekey: None,
            clock: DefaultClock::default(),
        }
    }

    /// Limits prekey uploads to `per_minute` per client; 0 = unlimited.
    pub fn with_prekey(mut self, per_minute: u32) -> Self {
        self.prekey = NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        self
    }

    /// Counts one request of `client` against `limit`; `Err(wait)` when over it.
    pub fn check(&self, limit: Limit, client: IpAddr) -> Result<(), Duration> {
        let limiter = match limit {
            Limit::Register => &self.register,
            Limit::Lookup => &self.lookup,
            Limit::Prekey => &self.prekey,
        };
        match limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(&client_key(client))
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Forgets clients whose buckets are full again (run periodically: memory).
    pub fn forget_idle(&self) {
        for limiter in [&self.register, &self.lookup, &self.prekey]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The rate-limit key of an address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), v4);
        assert_eq!(
            client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn limits_count_per_client_and_say_how_long_to_wait() {
        let limits = Limits::new(2, 0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limits.check(Limit::Register, a).is_ok());
        assert!(limits.check(Limit::Register, a).is_ok());
        let wait = limits.check(Limit::Register, a).unwrap_err();
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(
            limits.check(Limit::Register, b).is_ok(),
            "another client has its own bucket"
        );
        for _ in 0..1000 {
            assert!(limits.check(Limit::Lookup, a).is_ok(), "0 = unlimited");
            assert!(limits.check(Limit::Prekey, a).is_ok(), "off unless set");
        }
        limits.forget_idle();
        let limits = Limits::new(0, 0).with_prekey(1);
        assert!(limits.check(Limit::Prekey, a).is_ok());
        assert!(limits.check(Limit::Prekey, a).is_err(), "its own bucket");
        assert!(limits.check(Limit::Register, a).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
