//! Where a webhook may send: http(s) URLs whose host resolves only to public addresses, unless
//! the admin allows the rest (`RACK_WEBHOOK_ALLOW_PRIVATE`). A hook could otherwise make rack
//! reach what only rack can reach (its own API, Postgres, a cloud's metadata service).
//!
//! The check runs when a hook is created (to say at once what is wrong) and again at every
//! delivery, inside the HTTP client's resolver ([`CheckedResolver`]): the addresses checked
//! are the ones connected to, so a name that resolved to a public address at creation and to
//! 127.0.0.1 later (DNS rebinding) is refused then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `ip` is not a public address (`None`: it is one).
pub fn private_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => v4_kind(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return v4_kind(v4);
            }
            let first = ip.segments()[0];
            if ip.is_loopback() {
                Some("loopback")
            } else if ip.is_unspecified() {
                Some("unspecified")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if ip.is_multicast() {
                Some("multicast")
            } else if ip == Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0) || first == 0x2002 {
                // NAT64 and 6to4 embed IPv4 addresses that may be private.
                Some("translated (NAT64/6to4)")
            } else {
                None
            }
        }
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else {
        None
    }
}

/// The refusal of an address, saying what to do.
fn refusal(host: &str, ip: IpAddr, kind: &str) -> String {
    format!(
        "{host} resolves to {ip}, a {kind} address; webhooks reach only public addresses unless the rack's admin sets RACK_WEBHOOK_ALLOW_PRIVATE=1"
    )
}

/// Why a hook's URL is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not an http(s) URL at all (a 400).
    Invalid(String),
    /// An http(s) URL that rack will not send to: unparsable, not resolving, or reaching an
    /// address the policy refuses (a 422).
    Unreachable(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(why) | Self::Unreachable(why) => f.write_str(why),
        }
    }
}

/// Checks a hook's URL as it is registered: scheme, host, and the addresses it resolves to now.
///
/// # Errors
/// What is wrong with it.
pub async fn check_url(text: &str, allow_private: bool) -> Result<reqwest::Url, Refusal> {
    let text = text.trim();
    let scheme = text.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https") => {}
        Some(other) if !other.is_empty() && other.len() < 20 => {
            return Err(Refusal::Invalid(format!(
                "url: the scheme must be http or https, not {other:?}"
            )));
        }
        _ => {
            return Err(Refusal::Invalid("url: give an http:// or https:// URL".into()));
        }
    }
    if text.len() > 2000 {
        return Err(Refusal::Invalid("url: at most 2000 characters".into()));
    }
    let unreachable = |why: String| Refusal::Unreachable(format!("url: {why}"));
    let url = reqwest::Url::parse(text).map_err(|e| unreachable(e.to_string()))?;
    let Some(host) = url.host_str() else {
        return Err(unreachable("it has no host".into()));
    };
    if allow_private {
        return Ok(url);
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs = resolve(host.trim_start_matches('[').trim_end_matches(']'), port)
        .await
        .map_err(unreachable)?;
    for addr in addrs {
        if let Some(kind) = private_kind(addr.ip()) {
            return Err(unreachable(refusal(host, addr.ip(), kind)));
        }
    }
    Ok(url)
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(format!("{host} resolves to no address"))
            } else {
                Ok(addrs)
            }
        }
        Ok(Err(e)) => Err(format!("{host} does not resolve: {e}")),
        Err(_) => Err(format!("{host} did not resolve within {}s", RESOLVE_TIMEOUT.as_secs())),
    }
}

/// The check at delivery time of a URL whose host is an address (the resolver is not asked
/// for those).
///
/// # Errors
/// The refusal.
pub fn check_literal(url: &reqwest::Url, allow_private: bool) -> Result<(), String> {
    let Some(Ok(ip)) = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>())
    else {
        return Ok(());
    };
    match private_kind(ip) {
        Some(kind) if !allow_private => Err(refusal(&ip.to_string(), ip, kind)),
        _ => Ok(()),
    }
}

/// The delivery client's resolver: the system's, refusing private addresses unless allowed.
#[derive(Debug, Clone, Copy)]
pub struct CheckedResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve(&host, 0).await?;
            if !allow_private
                && let Some((ip, kind)) = addrs
                    .iter()
                    .find_map(|a| private_kind(a.ip()).map(|kind| (a.ip(), kind)))
            {
                return Err(refusal(&host, ip, kind).into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_named() {
        for (ip, kind) in [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("0.0.0.0", Some("unspecified")),
            ("100.64.0.1", Some("shared (carrier-grade NAT)")),
            ("::1", Some("loopback")),
            ("fe80::1", Some("link-local")),
            ("fd00::1", Some("private (unique local)")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("93.184.216.34", None),
            ("2606:2800:220:1::", None),
        ] {
            assert_eq!(private_kind(ip.parse().unwrap()), kind, "{ip}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_when_registered() {
        for url in [
            "http://127.0.0.1:9/hook",
            "http://[::1]:9/hook",
            "http://localhost:9/hook",
        ] {
            let refused = check_url(url, false).await.unwrap_err();
            assert!(matches!(refused, Refusal::Unreachable(_)), "{url}: {refused:?}");
            assert!(refused.to_string().contains("loopback"), "{refused}");
            assert!(
                refused.to_string().contains("RACK_WEBHOOK_ALLOW_PRIVATE=1"),
                "{refused}"
            );
        }
        let refused = check_url("ftp://example.com/", false).await.unwrap_err();
        assert!(
            matches!(refused, Refusal::Invalid(ref why) if why.contains("scheme")),
            "{refused:?}"
        );
        assert!(matches!(check_url("not a url", false).await, Err(Refusal::Invalid(_))));
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
    }
}
