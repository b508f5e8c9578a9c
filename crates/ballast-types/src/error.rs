/// Whether an error may go away if the same operation is tried again
/// (a leader change, a timeout, a full queue) or will not (bad input,
/// corruption, a missing volume). Every library error type implements it so
/// callers decide about retries without matching on strings.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}
