//! Identifiers: Convox-style public ids for builds and releases (`B`/`R` + 10 uppercase
//! letters) and random secrets.

use rand::RngExt;
use rand::distr::{Alphanumeric, Uniform};

/// A new id: `prefix` followed by 10 random uppercase ASCII letters, as Convox makes them.
pub fn public_id(prefix: char) -> String {
    let letters = Uniform::new_inclusive(b'A', b'Z').expect("A..=Z is a valid range");
    let mut rng = rand::rng();
    std::iter::once(prefix)
        .chain((0..10).map(|_| char::from(rng.sample(letters))))
        .collect()
}

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
    }

    #[test]
    fn tokens_have_the_asked_length() {
        let token = random_token(32);
        assert_eq!(token.len(), 32);
        assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
