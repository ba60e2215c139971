//! Where the primary is: one server, or several in libpq's multi-host form, of
//! which gavel uses the one that accepts writes.
//!
//! `postgres://user@host1:5432,host2:5432/gavel?target_session_attrs=read-write`
//! lists the servers a failover may move the primary between. sqlx takes one host
//! per URL, so gavel splits the list itself and does what libpq does: try the
//! hosts in order and keep the first whose session accepts writes. Each core
//! finds the primary when it starts and again whenever its LISTEN connection is
//! lost ([`crate::cache::listener`]), then points its pool there; a connection a
//! pool opens is checked the same way, so no write reaches a standby.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, PgExecutor};

/// How long one host may take to accept a connection while the primary is looked
/// for; a host that is down but not refusing (a lost machine) must not hold up
/// the next one for long.
pub const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// libpq's `target_session_attrs`, as far as a server that writes can use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// Any server that accepts the connection (libpq's default).
    Any,
    /// A session that is not read-only (`transaction_read_only` is off).
    ReadWrite,
    /// A server not in recovery.
    Primary,
}

impl FromStr for SessionAttrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(SessionAttrs::Any),
            "read-write" => Ok(SessionAttrs::ReadWrite),
            "primary" => Ok(SessionAttrs::Primary),
            "read-only" | "standby" | "prefer-standby" => {
                Err(format!("target_session_attrs={s} names a server gavel cannot write to; use read-write"))
            }
            _ => Err(format!("target_session_attrs={s} is not one of any, read-write, primary")),
        }
    }
}

/// The database gavel writes to: its candidate hosts, in the order given, and
/// what a session on one must be.
#[derive(Debug, Clone)]
pub struct Target {
    hosts: Vec<PgConnectOptions>,
    attrs: SessionAttrs,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not a postgres:// or postgresql:// URL")]
    Scheme,
    #[error("{0}")]
    Attrs(String),
    #[error("{0}")]
    Hosts(String),
    #[error("host {host:?}: {source}")]
    Host {
        host: String,
        #[source]
        source: sqlx::Error,
    },
}

impl From<PgConnectOptions> for Target {
    fn from(options: PgConnectOptions) -> Self {
        Target { hosts: vec![options], attrs: SessionAttrs::Any }
    }
}

impl Target {
    /// Parses a PostgreSQL URL whose host part may list several `host:port`,
    /// comma-separated, with an optional `target_session_attrs` parameter. As in
    /// libpq, the hosts may instead be listed in the `host` parameter
    /// (`?host=db1,db2&port=5432,5433`, or one port for all; a host starting with
    /// `/` is a socket directory), which then wins over the host part.
    pub fn parse(url: &str) -> Result<Target, ParseError> {
        let (scheme, rest) = url.split_once("://").ok_or(ParseError::Scheme)?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(ParseError::Scheme);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => authority.split_at(at + 1),
            None => ("", authority),
        };
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut attrs = SessionAttrs::Any;
        let mut listed: Option<(String, Option<String>)> = None;
        let mut kept = url::form_urlencoded::Serializer::new(String::new());
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let listed_in_query = pairs.iter().any(|(key, value)| (key == "host" || key == "port") && value.contains(','));
        for (key, value) in pairs {
            match key.as_str() {
                "target_session_attrs" => attrs = value.parse().map_err(ParseError::Attrs)?,
                "host" if listed_in_query => listed.get_or_insert_with(Default::default).0 = value,
                "port" if listed_in_query => listed.get_or_insert_with(Default::default).1 = Some(value),
                _ => {
                    kept.append_pair(&key, &value);
                }
            }
        }
        let kept = kept.finish();
        let query = if kept.is_empty() { String::new() } else { format!("?{kept}") };
        let hosts: Vec<PgConnectOptions> = match listed {
            None => hosts
                .split(',')
                .map(|host| {
                    PgConnectOptions::from_str(&format!("{scheme}://{userinfo}{host}{path}{query}"))
                        .map_err(|source| ParseError::Host { host: host.to_owned(), source })
                })
                .collect::<Result<_, _>>()?,
            Some((listed, ports)) => {
                // The rest of the URL once, with a stand-in host (a URL with a
                // user but no host is not one), then each listed host on it.
                let stand_in = if hosts.is_empty() { "localhost" } else { hosts };
                let base = PgConnectOptions::from_str(&format!("{scheme}://{userinfo}{stand_in}{path}{query}"))
                    .map_err(|source| ParseError::Host { host: stand_in.to_owned(), source })?;
                query_hosts(&base, &listed, ports.as_deref())?
            }
        };
        if hosts.len() > 1 && attrs == SessionAttrs::Any {
            // libpq would take the first host that answers, a standby as well;
            // gavel writes, so it must be told to look for the primary.
            return Err(ParseError::Attrs(
                "several hosts need target_session_attrs=read-write (or primary): gavel writes".into(),
            ));
        }
        Ok(Target { hosts, attrs })
    }

    /// The candidate hosts, in the order given.
    pub fn hosts(&self) -> &[PgConnectOptions] {
        &self.hosts
    }

    /// The options of host `index`.
    pub fn host(&self, index: usize) -> &PgConnectOptions {
        &self.hosts[index]
    }

    pub fn attrs(&self) -> SessionAttrs {
        self.attrs
    }

    /// More than one host to choose from: the primary has to be looked for.
    pub fn is_multi_host(&self) -> bool {
        self.hosts.len() > 1
    }

    /// Host `index` as logs name it (`host:port`, or the socket directory).
    pub fn describe(&self, index: usize) -> String {
        describe(&self.hosts[index])
    }

    /// The first host, in the order given, that accepts a connection whose
    /// session has the attributes asked for, as libpq picks one. One connection
    /// per host tried, closed again.
    pub async fn locate(&self) -> Result<usize, sqlx::Error> {
        let mut refused = Vec::with_capacity(self.hosts.len());
        for index in 0..self.hosts.len() {
            let connected = tokio::time::timeout(HOST_CONNECT_TIMEOUT, PgConnection::connect_with(&self.hosts[index]));
            let why = match connected.await {
                Ok(Ok(mut conn)) => {
                    let fits = fits(self.attrs, &mut conn).await;
                    let _ = conn.close().await;
                    match fits {
                        Ok(true) => return Ok(index),
                        Ok(false) => "does not accept writes".to_owned(),
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {HOST_CONNECT_TIMEOUT:?}"),
            };
            refused.push(format!("{}: {why}", self.describe(index)));
        }
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!("no host accepts writes ({})", refused.join("; ")),
        )))
    }
}

/// `base` on each host of the `host` parameter's list, with the `port`
/// parameter's port (one for all, or one per host).
fn query_hosts(base: &PgConnectOptions, hosts: &str, ports: Option<&str>) -> Result<Vec<PgConnectOptions>, ParseError> {
    let hosts: Vec<&str> = hosts.split(',').collect();
    let ports: Vec<&str> = ports.map(|p| p.split(',').collect()).unwrap_or_default();
    if !(ports.len() <= 1 || ports.len() == hosts.len()) {
        return Err(ParseError::Hosts(format!(
            "{} hosts but {} ports: give one port, or one per host",
            hosts.len(),
            ports.len()
        )));
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let invalid = |why: &str| ParseError::Host {
                host: (*host).to_owned(),
                source: sqlx::Error::Configuration(why.to_owned().into()),
            };
            let mut options = match *host {
                "" => return Err(invalid("empty host")),
                dir if dir.starts_with('/') => base.clone().socket(dir),
                name => base.clone().host(name),
            };
            if let Some(port) = ports.get(if ports.len() == 1 { 0 } else { i }) {
                options = options.port(port.parse().map_err(|_| invalid("invalid port"))?);
            }
            Ok(options)
        })
        .collect()
}

/// Whether the session on `conn` has the attributes `attrs` asks for. Always a
/// round trip, so that it also tells whether the server still answers.
pub async fn fits<'c>(attrs: SessionAttrs, conn: impl PgExecutor<'c>) -> Result<bool, sqlx::Error> {
    match attrs {
        SessionAttrs::Any => sqlx::query_scalar!(r#"select true as "answers!""#).fetch_one(conn).await,
        SessionAttrs::ReadWrite => {
            sqlx::query_scalar!(r#"select current_setting('transaction_read_only') = 'off' as "writable!""#)
                .fetch_one(conn)
                .await
        }
        SessionAttrs::Primary => {
            sqlx::query_scalar!(r#"select not pg_is_in_recovery() as "primary!""#).fetch_one(conn).await
        }
    }
}

/// A server as logs name it: `host:port`, or the socket directory.
pub fn describe(options: &PgConnectOptions) -> String {
    match options.get_socket() {
        Some(dir) => format!("{}:{}", dir.display(), options.get_port()),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_becomes_one_option_set_per_host() {
        let t = Target::parse(
            "postgres://app:pw@db1:5433,db2,[::1]:6000/gavel?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(t.attrs(), SessionAttrs::ReadWrite);
        let hosts: Vec<String> = (0..3).map(|i| t.describe(i)).collect();
        assert_eq!(hosts, ["db1:5433", "db2:5432", "[::1]:6000"]);
        for i in 0..3 {
            assert_eq!(t.host(i).get_username(), "app");
            assert_eq!(t.host(i).get_database(), Some("gavel"));
        }
        assert!(t.is_multi_host());
    }

    #[test]
    fn hosts_may_be_listed_in_the_host_parameter_as_libpq_allows() {
        let t = Target::parse(
            "postgres://app:pw@/gavel?host=db1,db2,/run/pg&port=5433,5434,5435&target_session_attrs=read-write",
        )
        .unwrap();
        let hosts: Vec<String> = (0..3).map(|i| t.describe(i)).collect();
        assert_eq!(hosts, ["db1:5433", "db2:5434", "/run/pg:5435"]);
        assert_eq!(t.host(2).get_username(), "app");
        assert_eq!(t.host(0).get_database(), Some("gavel"));
        let one_port = Target::parse("postgres:///gavel?host=db1,db2&port=6000&target_session_attrs=primary").unwrap();
        assert_eq!((one_port.describe(0), one_port.describe(1)), ("db1:6000".into(), "db2:6000".into()));
        for bad in ["host=db1,db2&port=1,2,3", "host=db1,&port=1", "host=db1,db2&port=x"] {
            let url = format!("postgres:///gavel?{bad}&target_session_attrs=read-write");
            assert!(Target::parse(&url).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_host_without_attributes_is_any() {
        let t = Target::parse("postgresql://app@db/gavel").unwrap();
        assert_eq!(t.attrs(), SessionAttrs::Any);
        assert!(!t.is_multi_host());
        let socket = Target::parse("postgres:///gavel?host=%2Frun%2Fpg").unwrap();
        assert!(socket.describe(0).starts_with("/run/pg:"), "{}", socket.describe(0));
    }

    #[test]
    fn attributes_gavel_cannot_write_with_are_refused() {
        let any = Target::parse("postgres://a@h1,h2/db").unwrap_err();
        assert!(any.to_string().contains("target_session_attrs=read-write"), "{any}");
        for bad in ["read-only", "standby", "prefer-standby", "sometimes"] {
            let err = Target::parse(&format!("postgres://a@h1,h2/db?target_session_attrs={bad}")).unwrap_err();
            assert!(matches!(err, ParseError::Attrs(_)), "{bad}: {err}");
        }
        assert!(matches!(Target::parse("mysql://a@h/db"), Err(ParseError::Scheme)));
        assert!(matches!(
            Target::parse("postgres://a@h1:notaport,h2/db?target_session_attrs=primary"),
            Err(ParseError::Host { .. })
        ));
    }
}
