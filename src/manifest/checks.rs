//! Checks on the manifest's text and values that need no parser state: the text's size and
//! nesting, names, ports and networks, and where a key sits in the text (for error lines).

use std::net::IpAddr;

use serde_yaml_ng::Value;

use super::{MAX_MANIFEST_BYTES, MAX_NESTING, ParseManifestError};

/// Refuses texts that are too large, too deeply nested or hold NUL characters, cheaply and
/// before the YAML parser sees them. Brackets count wherever they are (quoted or not): an
/// over-count can only refuse a pathological manifest, never let a deep one through.
pub(super) fn check_shape(text: &str) -> Result<(), ParseManifestError> {
    let refuse = |message: String, line: Option<usize>| {
        Err(ParseManifestError {
            key: String::new(),
            message,
            line,
        })
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return refuse(
            format!("the file is {} bytes; the most is {MAX_MANIFEST_BYTES}", text.len()),
            None,
        );
    }
    let (mut depth, mut line) = (0usize, 1usize);
    for c in text.chars() {
        match c {
            '\n' => line += 1,
            '\0' => return refuse("NUL characters are not allowed".to_owned(), Some(line)),
            '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return refuse(format!("nested more than {MAX_NESTING} levels deep"), Some(line));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn syntax_error(err: serde_yaml_ng::Error) -> ParseManifestError {
    let mut message = err.to_string();
    // The parser appends its own position; ours goes at the end in the common format.
    if let Some(at) = message.find(" at line ") {
        message.truncate(at);
    }
    let line = err.location().map(|l| l.line());
    ParseManifestError {
        key: String::new(),
        message,
        line,
    }
}

/// A lowercase DNS label (RFC 1123), as service names become hostnames and Kubernetes names.
pub(super) fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A port from 1 to 65535, written as a YAML number or a string of digits.
pub(super) fn port_number(value: &Value) -> Option<u16> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => Some(s.trim()).filter(|s| is_digits(s)).and_then(|s| s.parse().ok()),
        _ => None,
    };
    n.and_then(|n| u16::try_from(n).ok()).filter(|&port| port > 0)
}

pub(super) fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// An IPv4 or IPv6 address with an optional prefix length (a bare address is one host).
pub(super) fn is_cidr(text: &str) -> bool {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let Ok(address) = address.parse::<IpAddr>() else {
        return false;
    };
    let most = if address.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|prefix| is_digits(prefix) && prefix.parse::<u8>().is_ok_and(|n| n <= most))
}

/// A short description of a value for error messages.
pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a map".to_owned(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// The 1-based line of the key at `path`, found by indentation in block-style YAML. The parsed
/// tree keeps no positions, so this is a hint: in flow style it finds nothing rather than guess.
pub(super) fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    let mut parent: Option<(usize, usize)> = None; // (line index, indent) of the last segment found
    'segments: for segment in path {
        let mut child_indent = None;
        for (index, line) in lines.by_ref() {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') || body.starts_with("---") {
                continue;
            }
            let indent = line.len() - body.len();
            if parent.is_some_and(|(_, parent_indent)| indent <= parent_indent) {
                return None; // left the parent's block without finding the key
            }
            let key = body
                .split_once(':')
                .map(|(key, _)| key.trim().trim_matches(['"', '\'']));
            if indent == *child_indent.get_or_insert(indent) && key == Some(*segment) {
                parent = Some((index, indent));
                continue 'segments;
            }
        }
        return None;
    }
    parent.map(|(index, _)| index + 1)
}
