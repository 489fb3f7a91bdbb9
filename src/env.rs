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

/// Most variables a release's environment may have.
pub const MAX_KEYS: usize = 1000;

/// Largest a release's environment may be, in its text form: 256 KiB (an environment is copied
/// into every process, every release row, and a process's exec of its command fails past a
/// few hundred KiB anyway).
pub const MAX_BYTES: usize = 256 * 1024;

/// Most changes a release's description names one by one (`env add:A ... and 12 more`).
const MAX_DESCRIBED: usize = 20;

/// Refuses an environment larger than a release may hold; the error names the limit.
///
/// # Errors
/// When `env` has more than [`MAX_KEYS`] variables or is larger than [`MAX_BYTES`].
pub fn check_size(env: &Env) -> Result<(), String> {
    if env.len() > MAX_KEYS {
        return Err(format!(
            "the environment has {} variables: a release may have at most {MAX_KEYS}",
            env.len()
        ));
    }
    let bytes = env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        .saturating_sub(1);
    if bytes > MAX_BYTES {
        return Err(format!(
            "the environment is {bytes} bytes: a release may have at most {MAX_BYTES} bytes (256 KiB) of KEY=VALUE lines"
        ));
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

/// Convox's description of a change: `env add:A change:B remove:C` (empty when nothing
/// changed), naming at most [`MAX_DESCRIBED`] changes, then how many more there are.
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
    let mut parts = added.chain(changed).chain(removed);
    let named: Vec<String> = parts.by_ref().take(MAX_DESCRIBED).collect();
    let more = parts.count();
    match (named.is_empty(), more) {
        (true, _) => String::new(),
        (false, 0) => format!("env {}", named.join(" ")),
        (false, more) => format!("env {} and {more} more", named.join(" ")),
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

    #[test]
    fn descriptions_and_sizes_are_bounded() {
        let many: Env = (0..25).map(|i| (format!("K{i:02}"), String::new())).collect();
        let described = describe_change(&Env::new(), &many);
        assert!(described.starts_with("env add:K00 add:K01 "), "{described}");
        assert!(described.ends_with(" add:K19 and 5 more"), "{described}");
        assert!(check_size(&many).is_ok());
        let too_many: Env = (0..=MAX_KEYS).map(|i| (format!("K{i}"), String::new())).collect();
        assert!(check_size(&too_many).unwrap_err().contains("at most 1000"));
        let big: Env = [("A".to_owned(), "x".repeat(MAX_BYTES))].into();
        assert!(check_size(&big).unwrap_err().contains("256 KiB"));
        let fits: Env = [("A".to_owned(), "x".repeat(MAX_BYTES - 2))].into();
        assert_eq!(format(&fits).len(), MAX_BYTES);
        assert!(check_size(&fits).is_ok());
    }
}
