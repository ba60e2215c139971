//! The client's address, for the per-address log-in limit, and the connection
//! a request came on.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName};

use crate::core::Core;
use crate::events::Connection;

/// The client's address: the last one in `--client-address-header` when that
/// is set and the request carries it (the address the proxy in front saw),
/// else the connection's peer. `None` only for a request that came on no
/// connection (a test calling the router directly).
pub struct ClientAddr(pub Option<IpAddr>);

impl FromRequestParts<Arc<Core>> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, core: &Arc<Core>) -> Result<Self, Infallible> {
        let named = core.web.client_address_header.as_ref().and_then(|name| named_address(&parts.headers, name));
        Ok(ClientAddr(named.or_else(|| peer(parts).map(|p| p.ip()))))
    }
}

/// The connection a request came on, for the event streams it opens: its
/// streams are woken together ([`Connection`]).
impl<S: Sync> FromRequestParts<S> for Connection {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Connection::of(peer(parts)))
    }
}

/// The connection's peer, as the server recorded it (none for a request that
/// came on no connection).
fn peer(parts: &Parts) -> Option<SocketAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// The last address in header `name` (of one or more, comma-separated, as in
/// `X-Forwarded-For`), with or without a port.
fn named_address(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let last = headers.get_all(name).iter().next_back()?.to_str().ok()?.rsplit(',').next()?.trim();
    last.parse::<IpAddr>().ok().or_else(|| last.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn the_last_named_address_counts_with_or_without_a_port() {
        let name = HeaderName::from_static("x-forwarded-for");
        let with = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(&name, HeaderValue::from_static(v));
            }
            named_address(&headers, &name)
        };
        assert_eq!(with(&["203.0.113.9"]), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(with(&["10.0.0.1, 198.51.100.7"]), Some("198.51.100.7".parse().unwrap()));
        assert_eq!(with(&["10.0.0.1", "2001:db8::1"]), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(with(&["[2001:db8::2]:443"]), Some("2001:db8::2".parse().unwrap()));
        assert_eq!(with(&["198.51.100.7:8080"]), Some("198.51.100.7".parse().unwrap()));
        assert_eq!(with(&["unknown"]), None);
        assert_eq!(with(&[]), None);
    }
}
