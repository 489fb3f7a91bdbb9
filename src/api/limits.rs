//! Per-credential limits of the API: how many streams (logs, rollouts, exec) one credential
//! may hold open on this server at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::Principal;
use crate::error::ApiError;

/// Open streams per credential (`password`, or a token's id).
#[derive(Debug, Clone)]
pub struct StreamSlots {
    limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; the slot is given back when it is dropped (the stream ended).
#[derive(Debug)]
pub struct StreamSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    /// At most `limit` open streams per credential (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// A slot for a new stream of `principal`.
    ///
    /// # Errors
    /// 429 when the credential holds its limit already.
    pub fn take(&self, principal: Option<&Principal>) -> Result<StreamSlot, ApiError> {
        let key = principal
            .map(|p| p.token.map_or_else(|| p.name.clone(), |id| id.to_string()))
            .unwrap_or_default();
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(key.clone()).or_default();
        if self.limit > 0 && *count >= self.limit {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "this credential has {} streams open on this server already: close some (RACK_MAX_STREAMS_PER_CREDENTIAL)",
                    self.limit
                ),
                retry_after: 1,
            });
        }
        *count += 1;
        Ok(StreamSlot {
            key,
            open: self.open.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}
