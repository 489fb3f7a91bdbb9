//! Certificates users bring (`convox certs import`) or have rack make (`certs generate`): the
//! PEM checked (a certificate that parses, a private key that matches it, an optional chain),
//! and what the certificate names and until when, read from its DER with a small walker (the
//! few fields rack shows; rustls and webpki do the real validation when it is served).

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Most domains one certificate may name (`certs generate`).
pub const MAX_DOMAINS: usize = 100;

/// Why a certificate or key was refused; the text says what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A checked certificate: the PEM to keep (leaf, then chain), the key's PEM, and what it names.
#[derive(Debug)]
pub struct Checked {
    pub certificate_pem: String,
    pub key_pem: String,
    /// The common name, else the first DNS name.
    pub domain: String,
    pub domains: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

/// Checks an imported certificate (`pub`), its key and optional chain.
///
/// # Errors
/// When one is not PEM, the certificate does not parse, or the key is not the certificate's.
pub fn check(public: &str, key: &str, chain: Option<&str>) -> Result<Checked, Refused> {
    let leaf = certificates("pub", public)?;
    let mut chain_ders = match chain.filter(|c| !c.trim().is_empty()) {
        Some(chain) => certificates("chain", chain)?,
        None => Vec::new(),
    };
    let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|_| Refused("key: it is not a PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC)".into()))?;
    let first = leaf[0].clone();
    let names = names(&first).ok_or_else(|| Refused("pub: the certificate does not parse as X.509".into()))?;
    let mut all = leaf;
    all.append(&mut chain_ders);
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(all.clone(), key_der.clone_key(), &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            Refused("key: it does not match the certificate (it is another certificate's key)".into())
        }
        other => Refused(format!("key: it cannot sign for this certificate: {other}")),
    })?;
    let certificate_pem = all.iter().map(|der| pem("CERTIFICATE", der)).collect();
    let label = match &key_der {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    Ok(Checked {
        certificate_pem,
        key_pem: pem(label, key_der.secret_der()),
        domain: names.0,
        domains: names.1,
        expires_at: names.2,
    })
}

/// Makes a self-signed certificate for `domains`, valid for `days`.
///
/// # Errors
/// When a domain is not a DNS name (a leading `*.` allowed) or there are none or too many.
pub fn generate(domains: &[String], days: i64) -> Result<Checked, Refused> {
    if domains.is_empty() {
        return Err(Refused("domains: give at least one domain".into()));
    }
    if domains.len() > MAX_DOMAINS {
        return Err(Refused(format!("domains: at most {MAX_DOMAINS}")));
    }
    for d in domains {
        if !is_domain(d) {
            return Err(Refused(format!(
                "domains: {:?} is not a domain name (letters, digits, `-`, `.`; `*.` first for a wildcard)",
                d.chars().take(100).collect::<String>()
            )));
        }
    }
    let mut params = rcgen::CertificateParams::new(domains.to_vec()).map_err(|e| Refused(format!("domains: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, domains[0].as_str());
    let start = Utc::now() - chrono::Duration::hours(1);
    let end = Utc::now() + chrono::Duration::days(days);
    {
        use chrono::Datelike;
        params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
        params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
    }
    let key = rcgen::KeyPair::generate().map_err(|e| Refused(format!("generating the key: {e}")))?;
    let cert = params.self_signed(&key).map_err(|e| Refused(format!("signing: {e}")))?;
    check(&cert.pem(), &key.serialize_pem(), None)
}

/// The certificates of a PEM text (at least one).
fn certificates(field: &str, text: &str) -> Result<Vec<CertificateDer<'static>>, Refused> {
    let ders: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| Refused(format!("{field}: it is not PEM (-----BEGIN CERTIFICATE-----)")))?;
    if ders.is_empty() {
        return Err(Refused(format!(
            "{field}: it has no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    for der in &ders {
        if names(der).is_none() {
            return Err(Refused(format!("{field}: a certificate does not parse as X.509")));
        }
    }
    Ok(ders)
}

/// `der` as PEM with `label`.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A DNS name, or a wildcard one (`*.example.com`).
fn is_domain(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.is_empty()
        && name.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() < 64
                && !l.starts_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// What a certificate names and until when: (common name or first DNS name, DNS names, notAfter).
fn names(der: &[u8]) -> Option<(String, Vec<String>, DateTime<Utc>)> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, mut tbs, _) = tlv(cert)? else { return None };
    let mut field = || -> Option<(u8, &[u8])> {
        let (tag, body, rest) = tlv(tbs)?;
        tbs = rest;
        Some((tag, body))
    };
    let (mut tag, _) = field()?;
    if tag == 0xa0 {
        (tag, _) = field()?; // the version, then the serial number
    }
    if tag != 0x02 {
        return None;
    }
    field()?; // signature algorithm
    field()?; // issuer
    let (0x30, validity) = field()? else { return None };
    let (_, _, validity) = tlv(validity)?;
    let (time_tag, not_after, _) = tlv(validity)?;
    let expires = time(time_tag, not_after)?;
    let (0x30, subject) = field()? else { return None };
    let common_name = common_name(subject);
    field()?; // subject public key
    let mut dns = Vec::new();
    while let Some((tag, body)) = field() {
        if tag == 0xa3 {
            dns = san_dns(body).unwrap_or_default();
        }
    }
    let domain = common_name.or_else(|| dns.first().cloned()).unwrap_or_default();
    if dns.is_empty() && !domain.is_empty() {
        dns.push(domain.clone());
    }
    Some((domain, dns, expires))
}

/// The subject's common name (OID 2.5.4.3).
fn common_name(mut subject: &[u8]) -> Option<String> {
    while let Some((_, set, rest)) = tlv(subject) {
        subject = rest;
        let (_, attribute, _) = tlv(set)?;
        let (0x06, oid, value) = tlv(attribute)? else { continue };
        if oid == [0x55, 0x04, 0x03] {
            let (_, text, _) = tlv(value)?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

/// The DNS names of the subjectAltName extension (OID 2.5.29.17).
fn san_dns(extensions: &[u8]) -> Option<Vec<String>> {
    let (0x30, mut list, _) = tlv(extensions)? else {
        return None;
    };
    while let Some((_, extension, rest)) = tlv(list) {
        list = rest;
        let (0x06, oid, mut value) = tlv(extension)? else {
            continue;
        };
        if oid != [0x55, 0x1d, 0x11] {
            continue;
        }
        let (mut tag, mut body, after) = tlv(value)?;
        if tag == 0x01 {
            value = after; // critical
            (tag, body, _) = tlv(value)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (0x30, mut general, _) = tlv(body)? else {
            return None;
        };
        let mut out = Vec::new();
        while let Some((tag, name, rest)) = tlv(general) {
            general = rest;
            if tag == 0x82 {
                out.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        return Some(out);
    }
    None
}

/// A UTCTime (0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
fn time(tag: u8, text: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let num = |range: std::ops::Range<usize>| -> Option<u32> { rest.get(range)?.parse().ok() };
    let date = NaiveDate::from_ymd_opt(year, num(0..2)?, num(2..4)?)?;
    let at = date.and_hms_opt(num(4..6)?, num(6..8)?, num(8..10)?)?;
    Some(Utc.from_utc_datetime(&at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_name_their_domains_and_expiry() {
        let domains = vec!["app.example.com".to_owned(), "*.example.org".to_owned()];
        let cert = generate(&domains, 30).unwrap();
        assert_eq!(cert.domain, "app.example.com");
        assert_eq!(cert.domains, domains);
        let days = (cert.expires_at - Utc::now()).num_days();
        assert!((28..=30).contains(&days), "{days}");
        // It checks again as an import, and another certificate's key does not match it.
        assert!(check(&cert.certificate_pem, &cert.key_pem, None).is_ok());
        let other = generate(&["b.example.com".to_owned()], 1).unwrap();
        let err = check(&cert.certificate_pem, &other.key_pem, None).unwrap_err();
        assert!(err.0.contains("does not match"), "{err}");
        let err = check("hello", &cert.key_pem, None).unwrap_err();
        assert!(err.0.starts_with("pub:"), "{err}");
        let err = check(&cert.certificate_pem, "nope", None).unwrap_err();
        assert!(err.0.starts_with("key:"), "{err}");
        assert!(generate(&["bad name".to_owned()], 1).is_err());
        assert!(generate(&[], 1).is_err());
    }

    #[test]
    fn times_read_both_asn1_forms() {
        assert_eq!(
            time(0x17, b"491231235959Z").unwrap().to_rfc3339(),
            "2049-12-31T23:59:59+00:00"
        );
        assert_eq!(
            time(0x17, b"500101000000Z").unwrap().to_rfc3339(),
            "1950-01-01T00:00:00+00:00"
        );
        assert_eq!(
            time(0x18, b"20991231235959Z").unwrap().to_rfc3339(),
            "2099-12-31T23:59:59+00:00"
        );
        assert!(time(0x18, b"2099").is_none());
    }
}
