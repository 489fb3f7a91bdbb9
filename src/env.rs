//! Release environments in convox's text form: `KEY=VALUE` lines, sorted, joined with `\n`,
//! no trailing newline. Parsing splits on the first `=`; lines without one are ignored, as
//! convox does, but keys must be valid variable names.

use std::collections::BTreeMap;

/// An environment.
pub type Env = BTreeMap<String, String>;

/// Why an environment text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseEnvError {
    #[error("invalid environment variable name {0:?}: use letters, digits and '_', not starting with a digit")]
    InvalidName(String),
    /// No process environment (and no database row) can hold a NUL character.
    #[error("the value of environment variable {0} contains a NUL character")]
    Nul(String),
}

/// Parses `KEY=VALUE` lines.
///
/// # Errors
/// When a key is not a valid variable name, or a value holds a NUL character.
pub fn parse(text: &str) -> Result<Env, ParseEnvError> {
    let mut env = Env::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        check(key, value)?;
        env.insert(key.to_owned(), value.to_owned());
    }
    Ok(env)
}

/// An environment from separate names and values (a one-off's `Environment` header), where a
/// value may hold a newline but a name may not.
///
/// # Errors
/// As [`parse`].
pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Env, ParseEnvError> {
    let mut env = Env::new();
    for (key, value) in pairs {
        check(&key, &value)?;
        env.insert(key, value);
    }
    Ok(env)
}

fn check(key: &str, value: &str) -> Result<(), ParseEnvError> {
    let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(ParseEnvError::InvalidName(key.chars().take(80).collect()));
    }
    if value.contains('\0') {
        return Err(ParseEnvError::Nul(key.to_owned()));
    }
    Ok(())
}

/// The text form of `env`.
pub fn format(env: &Env) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Convox's description of a change: `env add:A change:B remove:C` (empty when nothing changed).
pub fn describe_change(old: &Env, new: &Env) -> String {
    let added = new.keys().filter(|k| !old.contains_key(*k)).map(|k| format!("add:{k}"));
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| format!("change:{k}"));
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| format!("remove:{k}"));
    let parts: Vec<String> = added.chain(changed).chain(removed).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("env {}", parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_sorted() {
        let env = parse("B=2\nA=1=x\n\njunk line\nC=").unwrap();
        assert_eq!(format(&env), "A=1=x\nB=2\nC=");
        assert!(parse("1A=x").is_err());
        assert!(parse("A B=x").is_err());
        assert_eq!(parse("A=x\0y"), Err(ParseEnvError::Nul("A".into())));
    }

    #[test]
    fn pairs_keep_newlines_in_values_but_not_in_names() {
        let env = from_pairs([("A".to_owned(), "1\nB=2".to_owned())]).unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env["A"], "1\nB=2");
        assert!(from_pairs([("A\nB".to_owned(), "1".to_owned())]).is_err());
        assert!(from_pairs([("A".to_owned(), "\0".to_owned())]).is_err());
    }

    #[test]
    fn describes_changes_like_convox() {
        let old = parse("A=1\nB=2\nC=3").unwrap();
        let new = parse("A=1\nB=9\nD=4").unwrap();
        assert_eq!(describe_change(&old, &new), "env add:D change:B remove:C");
        assert_eq!(describe_change(&old, &old), "");
    }
}
