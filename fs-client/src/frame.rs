//! Length-prefixed postcard frames on QUIC streams (and on the local
//! Unix sockets of [`crate::local`]).

use serde::{de::DeserializeOwned, Serialize};

/// Largest control frame (requests, replies, stream items). Bulk data does
/// not travel in frames.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("stream closed")]
    Closed,
    #[error("stream: {0}")]
    Stream(String),
    #[error("undecodable frame: {0}")]
    Decode(String),
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_allocvec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    send.write_all(&bytes).await.map_err(|e| FrameError::Stream(e.to_string()))
}

/// Writes one frame followed by the pieces of `data` (bulk bytes, not
/// copied) in one call, so that a small request or reply and its data leave in one
/// datagram rather than the frame alone first (the connection's driver,
/// on another thread, sends whatever is queued as soon as it is woken).
pub async fn write_frame_with<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    data: impl IntoIterator<Item = bytes::Bytes>,
) -> Result<(), FrameError> {
    let mut all = vec![bytes::Bytes::from(encode(msg)?)];
    all.extend(data);
    send.write_all_chunks(&mut all).await.map_err(|e| FrameError::Stream(e.to_string()))
}

/// Reads one frame; [`FrameError::Closed`] when the stream ended cleanly
/// before a frame began.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Stream(e.to_string())),
    }
    let mut body = frame_body(len)?;
    recv.read_exact(&mut body).await.map_err(|e| FrameError::Stream(e.to_string()))?;
    decode(&body)
}

/// A buffer for the body of a frame whose length prefix is `len`.
fn frame_body(len: [u8; 4]) -> Result<Vec<u8>, FrameError> {
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(vec![0u8; len])
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// [`read_frame`] on a byte stream (a Unix socket): [`FrameError::Closed`]
/// when it ended cleanly before a frame began.
pub async fn read_frame_io<T: DeserializeOwned>(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<T, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let n = io.read(&mut len).await.map_err(|e| FrameError::Stream(e.to_string()))?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    io.read_exact(&mut len[n..]).await.map_err(|e| FrameError::Stream(e.to_string()))?;
    let mut body = frame_body(len)?;
    io.read_exact(&mut body).await.map_err(|e| FrameError::Stream(e.to_string()))?;
    decode(&body)
}

/// [`write_frame_with`] on a byte stream (a Unix socket).
pub async fn write_frame_io<T: Serialize>(
    io: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
    data: &[bytes::Bytes],
) -> Result<(), FrameError> {
    use tokio::io::AsyncWriteExt;
    let stream = |e: std::io::Error| FrameError::Stream(e.to_string());
    io.write_all(&encode(msg)?).await.map_err(stream)?;
    for d in data {
        io.write_all(d).await.map_err(stream)?;
    }
    io.flush().await.map_err(stream)
}
