//! The compact binary format of everything this crate persists or hands to a
//! transport: one format-version byte, then postcard.
//!
//! Log entries, votes, membership and snapshot headers are all written this
//! way. A new version gets a new byte and keeps decoding the old ones.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The current record format.
pub const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record format version {0} is unknown to this binary (newest known: {FORMAT_V1})")]
    UnknownVersion(u8),
    #[error("malformed record: {0}")]
    Decode(postcard::Error),
    #[error("encoding a record: {0}")]
    Encode(postcard::Error),
}

impl From<CodecError> for std::io::Error {
    fn from(e: CodecError) -> Self {
        let kind = match e {
            CodecError::Encode(_) => std::io::ErrorKind::Other,
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

/// Encode `value` as a versioned record.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    let out = postcard::to_extend(value, vec![FORMAT_V1]).map_err(CodecError::Encode)?;
    Ok(Bytes::from(out))
}

/// Decode a versioned record; never panics on bad input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT_V1, body)) => postcard::from_bytes(body).map_err(CodecError::Decode),
        Some((v, _)) => Err(CodecError::UnknownVersion(*v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ShardRequest, TypeConfig};
    use ballast_types::VolumeId;
    use openraft::entry::RaftEntry;

    #[test]
    fn entries_roundtrip_and_bad_input_is_an_error() {
        let req =
            ShardRequest::Write { volume: VolumeId(7), epoch: 3, offset: 4096, data: Bytes::from(vec![9u8; 4096]) };
        let log_id = openraft::alias::LogIdOf::<TypeConfig>::new(
            <openraft::impls::leader_id_adv::LeaderId<u64, u64> as openraft::vote::RaftLeaderId>::new(2, 1),
            10,
        );
        let entry = crate::types::Entry::new_normal(log_id, req);
        let bytes = encode(&entry).expect("encode");
        assert!(bytes.len() < 4096 + 32, "compact: {} bytes", bytes.len());
        let back: crate::types::Entry = decode(&bytes).expect("decode");
        assert_eq!(back, entry);
        assert!(matches!(decode::<crate::types::Entry>(&[]), Err(CodecError::Empty)));
        assert!(matches!(decode::<crate::types::Entry>(&[9, 1, 2]), Err(CodecError::UnknownVersion(9))));
        assert!(matches!(decode::<crate::types::Entry>(&bytes[..bytes.len() / 2]), Err(CodecError::Decode(_))));
    }
}
