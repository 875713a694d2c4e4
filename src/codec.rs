//! The codec of the server's stubs: prost, except that a request whose
//! bytes are not a valid message answers `INVALID_ARGUMENT` (reason
//! `UNDECODABLE_REQUEST`) rather than prost's `INTERNAL`, which oncely keeps
//! for its own bugs. `build.rs` names this codec for every server stub.

use std::{collections::HashMap, marker::PhantomData};

use oncely_client::reasons;
use prost::Message;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

/// Prost encoding, with decode errors that blame the request.
#[derive(Debug, Clone)]
pub struct OncelyCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for OncelyCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for OncelyCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(Default::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstDecoder::default())
    }
}

/// Prost's decoder with its error turned into the caller's.
#[derive(Debug)]
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            let message = format!(
                "the request is not a valid protobuf message for this method ({}); send the method's request type",
                innermost(status.message())
            );
            let details = ErrorDetails::with_error_info(
                reasons::UNDECODABLE_REQUEST,
                reasons::DOMAIN,
                HashMap::<String, String>::new(),
            );
            Status::with_error_details(Code::InvalidArgument, message, details)
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// The end of prost's message: the innermost field where decoding failed
/// (`Message.field`) and why. Prost names every enclosing field before it,
/// so the whole message grows with the nesting of the input; this part
/// does not.
fn innermost(message: &str) -> &str {
    let name = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let is_field = |part: &str| {
        part.split_once('.')
            .is_some_and(|(message, field)| name(message) && name(field))
    };
    let mut at = None;
    let mut offset = 0;
    for part in message.split(": ") {
        if is_field(part) {
            at = Some(offset);
        }
        offset += part.len() + 2;
    }
    match at {
        Some(at) => &message[at..],
        None => message.rsplit(": ").next().unwrap_or(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_failing_field_and_the_reason_are_kept() {
        assert_eq!(
            innermost(
                "failed to decode Protobuf message: Struct.fields: Value.kind: CreateTaskRequest.parameters: recursion limit reached"
            ),
            "CreateTaskRequest.parameters: recursion limit reached"
        );
        assert_eq!(innermost("buffer underflow"), "buffer underflow");
        // A reason that holds ": " itself keeps its field.
        assert_eq!(
            innermost(
                "failed to decode Protobuf message: CreateTaskRequest.agent_id: invalid string value: data is not UTF-8 encoded"
            ),
            "CreateTaskRequest.agent_id: invalid string value: data is not UTF-8 encoded"
        );
    }
}
