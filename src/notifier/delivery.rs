//! What every callback sender (HTTP today) answers when a callback was not delivered.

/// Why a callback was not delivered, and whether another attempt could change that.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver failed or could not be reached: worth another attempt, if any are
    /// left (`notifier.callback_retries`).
    #[error("{0}")]
    Retry(String),
    /// The same attempt would fail the same way (a refused address, a destination that
    /// cannot be used): the callback fails at once.
    #[error("{0}")]
    Permanent(String),
}

impl DeliveryError {
    pub fn retryable(&self) -> bool {
        matches!(self, DeliveryError::Retry(_))
    }
}
