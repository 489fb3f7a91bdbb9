//! Source tarballs: `unpack` turns an uploaded `.tgz` into a build directory so that no entry
//! can land or point outside it (security-critical: it reads untrusted input); `pack` makes one
//! from a directory (honouring `.dockerignore`) for upload. They share only [`Limits`]. `cp`
//! checks the plain tar a `cp` into a process sends.

pub mod cp;
mod pack;
#[cfg(test)]
mod tests;
mod unpack;

pub use pack::{PackStats, pack_tgz, pack_tree_tgz};
pub use unpack::{UnpackError, UnpackStats, unpack_tgz};

/// Bounds on what one archive may unpack to, enforced while streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of file content written.
    pub max_bytes: u64,
    /// Entries of any kind, directories included.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 4 << 30,
            max_entries: 100_000,
        }
    }
}
