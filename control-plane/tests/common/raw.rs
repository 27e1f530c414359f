//! Calling any gRPC method with raw bytes (for the control plane's own tests: the agent's tests
//! share `common` but not this, nor its dependencies).

use std::time::Duration;

#[derive(Clone, Copy, Default)]
pub struct Raw;
pub struct RawEncoder;
pub struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src)).to_vec();
        Ok(Some(v))
    }
}

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls `path` with one message `body` (streamed, which on the wire is also what a unary call
/// sends) and answers the status it ended with.
pub async fn call_raw(ch: tonic::transport::Channel, path: &str, body: Vec<u8>) -> tonic::Status {
    call_as(ch, path, body, None).await
}

/// `call_raw` with an `authorization` header, when given. A connection that fails (a handshake
/// refused) answers UNAVAILABLE.
pub async fn call_as(
    ch: tonic::transport::Channel,
    path: &str,
    body: Vec<u8>,
    authorization: Option<&str>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(format!("no connection: {e}"));
    }
    let mut request = tonic::Request::new(tokio_stream::iter(vec![body]));
    if let Some(a) = authorization {
        request.metadata_mut().insert("authorization", a.parse().unwrap());
    }
    let path = http::uri::PathAndQuery::try_from(path.to_string()).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), grpc.streaming(request, path, Raw)).await {
        Err(_) => tonic::Status::deadline_exceeded("no answer"),
        Ok(Err(status)) => status,
        Ok(Ok(response)) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return tonic::Status::ok(""),
                    Err(s) => return s,
                }
            }
        }
    }
}
