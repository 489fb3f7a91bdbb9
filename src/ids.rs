//! Identifiers: Convox-style public ids for builds and releases (`B`/`R` + 10 uppercase
//! letters) and random secrets.

use rand::RngExt;
use rand::distr::{Alphanumeric, Uniform};

/// A new id: `prefix` followed by 10 random uppercase ASCII letters, as Convox makes them.
fn public_id(prefix: char) -> String {
    let letters = Uniform::new_inclusive(b'A', b'Z').expect("A..=Z is a valid range");
    let mut rng = rand::rng();
    std::iter::once(prefix)
        .chain((0..10).map(|_| char::from(rng.sample(letters))))
        .collect()
}

/// Defines a Convox-style public id type: text in the database and JSON, `<prefix>` + 10
/// uppercase letters when rack makes one, any text when a client names one (an unknown id is
/// then simply not found).
macro_rules! public_id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            Default,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            sqlx::Type,
            serde::Serialize,
            serde::Deserialize,
        )]
        #[sqlx(transparent)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A new random id.
            pub fn generate() -> Self {
                Self(public_id($prefix))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                self.0.as_ref()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

public_id_type!(
    /// A build's id: `B` + 10 uppercase letters.
    BuildId,
    'B'
);
public_id_type!(
    /// A release's id: `R` + 10 uppercase letters.
    ReleaseId,
    'R'
);

/// A random alphanumeric secret of `len` characters from the operating system's CSPRNG
/// (through the thread-local generator, which it seeds).
pub fn random_token(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_look_like_convox_ids() {
        let id = public_id('B');
        assert_eq!(id.len(), 11);
        assert!(id.starts_with('B'));
        assert!(id[1..].bytes().all(|b| b.is_ascii_uppercase()));
        assert_ne!(public_id('R'), public_id('R'));
        let build = BuildId::generate();
        assert!(build.starts_with('B') && build.len() == 11);
        assert_eq!(serde_json::to_string(&ReleaseId::from("RABC")).unwrap(), "\"RABC\"");
        assert_eq!(ReleaseId::from("RABC"), "RABC");
    }

    #[test]
    fn tokens_have_the_asked_length() {
        let token = random_token(32);
        assert_eq!(token.len(), 32);
        assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
