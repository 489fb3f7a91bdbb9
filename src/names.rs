//! Validated names. An app name becomes a Kubernetes namespace, a directory and a URL segment,
//! so it is checked once, at the edge, and carried as [`AppName`] from there on.

use std::fmt;

/// Names no app may take: the rack's own components use them.
const RESERVED: &[&str] = &["rack", "system"];

/// A valid app name: a lowercase DNS label (RFC 1123) that is not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct AppName(String);

/// Why a string is not a valid app name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid app name {name:?}: {reason}")]
pub struct ParseAppNameError {
    name: String,
    reason: &'static str,
}

impl AppName {
    /// Checks `name`. Reserved names are accepted here; use [`AppName::parse_new`] for names of
    /// apps about to be created.
    ///
    /// # Errors
    /// When `name` is not a lowercase DNS label.
    pub fn parse(name: &str) -> Result<Self, ParseAppNameError> {
        let fail = |reason| {
            Err(ParseAppNameError {
                name: name.chars().take(80).collect(),
                reason,
            })
        };
        if name.is_empty() {
            return fail("it is empty");
        }
        if name.len() > 63 {
            return fail("it is longer than 63 characters");
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return fail("it must start with a lowercase letter");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return fail("use only lowercase letters, digits and '-'");
        }
        if name.ends_with('-') {
            return fail("it must not end with '-'");
        }
        Ok(Self(name.to_owned()))
    }

    /// Checks `name` for a new app: as [`AppName::parse`], and not reserved.
    ///
    /// # Errors
    /// When `name` is invalid or reserved.
    pub fn parse_new(name: &str) -> Result<Self, ParseAppNameError> {
        let parsed = Self::parse(name)?;
        if RESERVED.contains(&name) {
            return Err(ParseAppNameError {
                name: name.to_owned(),
                reason: "the name is reserved",
            });
        }
        Ok(parsed)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for name in ["a", "myapp", "my-app-2", &"a".repeat(63)] {
            assert_eq!(AppName::parse_new(name).map(|n| n.to_string()), Ok(name.to_owned()));
        }
    }

    #[test]
    fn rejects_what_is_not_a_dns_label() {
        for name in [
            "",
            "1app",
            "-app",
            "app-",
            "My-App",
            "my_app",
            "a.b",
            "ä",
            &"a".repeat(64),
        ] {
            assert!(AppName::parse(name).is_err(), "{name:?} should be rejected");
        }
    }

    #[test]
    fn reserved_names_are_refused_for_new_apps() {
        assert!(AppName::parse("system").is_ok());
        let err = AppName::parse_new("system").unwrap_err();
        assert_eq!(err.to_string(), "invalid app name \"system\": the name is reserved");
    }
}
