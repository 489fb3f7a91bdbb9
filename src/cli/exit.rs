//! The CLI's exit codes, which scripts branch on (documented in the README): 0 ok, 1 failed,
//! 2 usage (clap's), 3 a rollout rolled back, 4 the rack refused the credential, 5 the rack
//! could not be reached. Errors carry their kind as a type; `code` reads it back.

/// Anything else that failed (a refused request, a failed build...).
pub const FAILED: u8 = 1;
/// A rollout (deploy, promote, rollback, `env set --promote`) ended with another release
/// active: rolled back, or cancelled.
pub const ROLLED_BACK: u8 = 3;
/// The rack answered 401: no credential, or a wrong, revoked or expired one.
pub const AUTH_FAILED: u8 = 4;
/// The rack could not be reached (nothing listens, DNS, TLS refused).
pub const UNREACHABLE: u8 = 5;

/// A rollout that ended with another release active; the message says why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RolledBack(pub String);

/// The rack refused the credential (401); the message is the rack's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthFailed(pub String);

/// The rack could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// A command's exit code to pass through (a remote command's), with nothing to print.
#[derive(Debug, thiserror::Error)]
#[error("exit {0}")]
pub struct ExitWith(pub i32);

/// The exit code for a failed command's error.
pub fn code(error: &anyhow::Error) -> u8 {
    let is = |f: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool| error.chain().any(f);
    if is(&|e| e.is::<RolledBack>()) {
        ROLLED_BACK
    } else if is(&|e| e.is::<AuthFailed>()) {
        AUTH_FAILED
    } else if is(&|e| e.is::<Unreachable>()) {
        UNREACHABLE
    } else {
        FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_error_kind_through_context() {
        let rolled = anyhow::Error::new(RolledBack("health check failed".into())).context("promoting");
        assert_eq!(code(&rolled), ROLLED_BACK);
        assert_eq!(
            code(&anyhow::Error::new(AuthFailed("invalid authentication".into()))),
            AUTH_FAILED
        );
        assert_eq!(
            code(&anyhow::Error::new(Unreachable("nothing there".into()))),
            UNREACHABLE
        );
        assert_eq!(code(&anyhow::anyhow!("build failed")), FAILED);
    }
}
