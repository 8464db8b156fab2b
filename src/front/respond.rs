//! Reading a request head off a raw connection, and ending a connection with a final answer.

use crate::stream::Stream;
use crate::upstream::Refusal;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a refused client gets to read our answer before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);

pub enum HeadRead {
    More,
    Closed,
    TimedOut,
    TooLarge,
}

/// Reads more of a request head into `buf`, up to `max` bytes in all, until `deadline`.
pub async fn read_head_bytes(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> HeadRead {
    if buf.len() >= max {
        return HeadRead::TooLarge;
    }
    let read = tokio::time::timeout_at(deadline, stream.read_appending(buf, max)).await;
    let n = match read {
        Err(_) => return HeadRead::TimedOut,
        Ok(Ok(n)) => n,
        Ok(Err(_)) => 0,
    };
    if n == 0 {
        HeadRead::Closed
    } else {
        HeadRead::More
    }
}

/// Answers with `status` and a one-line body, then closes.
pub async fn refuse(stream: &mut Stream, status: u16, reason: &str, extra: &[(&str, &str)]) {
    finish_with(stream, &Refusal::plain(status, reason, extra).to_bytes()).await;
}

/// Writes a final response, shuts down our side and drains what the client still sends for a
/// moment, so the close does not turn into a reset that destroys the response in flight.
pub async fn finish_with(stream: &mut Stream, response: &[u8]) {
    let linger = async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}
