//! The signature of a delivery: HMAC-SHA256 with the hook's secret over `<timestamp>.<body>`,
//! in hex, sent as `Rack-Webhook-Signature: v1=<hex>` next to `Rack-Webhook-Timestamp`.
//! Signing the timestamp with the body lets a receiver refuse old deliveries replayed by
//! someone who captured one (the README's example allows 5 minutes).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header with the delivery's id (the same on every attempt: receivers dedupe on it).
pub const ID_HEADER: &str = "rack-webhook-id";
/// The header with the attempt's time, in seconds since the epoch.
pub const TIMESTAMP_HEADER: &str = "rack-webhook-timestamp";
/// The header with the signature.
pub const SIGNATURE_HEADER: &str = "rack-webhook-signature";
/// The header with the event's kind.
pub const EVENT_HEADER: &str = "rack-webhook-event";
/// The header with the attempt's number (1 for the first).
pub const ATTEMPT_HEADER: &str = "rack-webhook-attempt";

/// The prefix of hook secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new hook secret.
pub fn new_secret() -> String {
    format!("{SECRET_PREFIX}{}", crate::ids::random_token(40))
}

/// The value of the signature header for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC accepts every key length")
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", crate::objects::hex(&mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_reference_hmac() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"whsec_k",b"1700000000.{}",hashlib.sha256).hexdigest())'
        assert_eq!(
            sign("whsec_k", 1_700_000_000, b"{}"),
            "v1=8b20524faff2b12e1089e404a8cf60fbe577e5320e899ebff7329ebbcb9ada22"
        );
    }
}
