//! A uid of its own for each app's sandboxed processes (when rack is root): `RACK_APP_UID_BASE`
//! plus the app's offset, kept in the store so it is the same after a restart, with a group of
//! the same number. An app's build directories are its uid's and only its (mode 0700), so even
//! a process that got out of its sandbox's namespaces could neither read another app's files
//! nor signal its processes: the kernel's own checks between users stand behind the sandbox.

use std::sync::Arc;

use super::sandbox::Sandbox;
use crate::runtime::AppUids;

/// How apps get their uids.
#[derive(Debug, Clone)]
pub struct AppAccounts {
    pub uids: Arc<dyn AppUids>,
    /// The first uid of the range.
    pub base: u32,
    /// How many uids the range holds (so how many apps it serves).
    pub count: u32,
}

impl AppAccounts {
    /// `sandbox` running as `app`'s own uid; unchanged when rack is not root (sandboxes run as
    /// rack's own user then).
    ///
    /// # Errors
    /// When the store cannot be reached, or the range is used up.
    pub async fn sandbox(&self, sandbox: &Sandbox, app: &str) -> std::io::Result<Sandbox> {
        if !sandbox.switches_user() {
            return Ok(sandbox.clone());
        }
        let offset = self.uids.offset(app).await.map_err(std::io::Error::other)?;
        if offset >= self.count {
            return Err(std::io::Error::other(format!(
                "the {} uids of RACK_APP_UID_COUNT are all given to apps: raise it",
                self.count
            )));
        }
        let uid = self
            .base
            .checked_add(offset)
            .ok_or_else(|| std::io::Error::other("RACK_APP_UID_BASE + the app's offset is past the largest uid"))?;
        Ok(sandbox.as_uid(uid))
    }
}
