//! A small QMP client (the QEMU Machine Protocol): newline-delimited JSON
//! over a unix socket. Connect reads the greeting and negotiates
//! capabilities; then each command is sent with an id and its reply read,
//! skipping the asynchronous events in between. Every read is bounded in
//! time and size.
//!
//! qemu serves one QMP client at a time on a socket; a second client waits
//! (unanswered) until the first disconnects, which the timeouts bound. The
//! drivers therefore open a connection per operation and close it after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Timeout of a connection (greeting and capabilities) and of each command.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest QMP message accepted; qemu's replies to our commands are tiny.
pub const MAX_QMP_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket i/o")]
    Io(#[from] std::io::Error),
    #[error("no answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("qemu closed the connection")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
}

/// `query-status`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct QmpStatus {
    /// `running`, `paused`, `shutdown`, `guest-panicked`, `io-error`…
    pub status: String,
    pub running: bool,
}

/// One QMP session, ready for commands.
pub struct Qmp<S = UnixStream> {
    stream: BufReader<S>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp<UnixStream> {
    /// Connects to qemu's QMP socket and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = bounded(timeout, async {
            UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.to_owned(), source })
        })
        .await?;
        Self::handshake(stream, timeout).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Reads the greeting and sends `qmp_capabilities` on a connected stream.
    pub async fn handshake(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let mut qmp = Qmp { stream: BufReader::new(stream), next_id: 1, timeout };
        let greeting = bounded(timeout, qmp.read_message()).await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let timeout = self.timeout;
        bounded(timeout, async {
            self.stream.get_mut().write_all(line.as_bytes()).await?;
            loop {
                let reply = self.read_message().await?;
                if reply.get("event").is_some() {
                    continue;
                }
                // Replies carry our id back; a reply without one answers a
                // command qemu could not parse.
                if reply.get("id").is_some_and(|v| v != &json!(id)) {
                    continue;
                }
                if let Some(ret) = reply.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = reply.get("error") {
                    let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                    return Err(QmpError::Command { class: field("class"), desc: field("desc") });
                }
                return Err(QmpError::Protocol(format!("unexpected message {reply}")));
            }
        })
        .await
    }

    /// `query-status`.
    pub async fn query_status(&mut self) -> Result<QmpStatus, QmpError> {
        let v = self.execute("query-status", None).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("query-status: {e}")))
    }

    /// Reads one message, at most [`MAX_QMP_MESSAGE`] bytes.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let mut buf = Vec::new();
            let n = (&mut self.stream).take(MAX_QMP_MESSAGE as u64 + 1).read_until(b'\n', &mut buf).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if buf.last() != Some(&b'\n') {
                if buf.len() > MAX_QMP_MESSAGE {
                    return Err(QmpError::Protocol(format!("message longer than {MAX_QMP_MESSAGE} bytes")));
                }
                return Err(QmpError::Closed);
            }
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_slice(text).map_err(|e| QmpError::Protocol(format!("bad JSON: {e}")));
        }
    }
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, QmpError>>,
) -> Result<T, QmpError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| QmpError::Timeout { timeout_ms: timeout.as_millis() as u64 })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    /// A fake qemu on the other end of a pipe: answers each command with
    /// `reply(command)`, after an event.
    async fn fake_qemu(server: DuplexStream, reply: fn(&str, &Value) -> Value) {
        let (r, mut w) = tokio::io::split(server);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").await.unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg: Value = serde_json::from_str(&line).unwrap();
            let cmd = msg["execute"].as_str().unwrap().to_owned();
            let mut out = json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}).to_string();
            out.push('\n');
            let mut ans = reply(&cmd, &msg);
            ans["id"] = msg["id"].clone();
            out.push_str(&ans.to_string());
            out.push('\n');
            w.write_all(out.as_bytes()).await.unwrap();
        }
    }

    fn answers(cmd: &str, _msg: &Value) -> Value {
        match cmd {
            "qmp_capabilities" | "stop" => json!({"return": {}}),
            "query-status" => json!({"return": {"status": "paused", "singlestep": false, "running": false}}),
            _ => {
                json!({"error": {"class": "CommandNotFound", "desc": format!("The command {cmd} has not been found")}})
            }
        }
    }

    #[tokio::test]
    async fn handshake_commands_events_and_errors() {
        let (client, server) = duplex(4096);
        tokio::spawn(fake_qemu(server, answers));
        let mut qmp = Qmp::handshake(client, QMP_TIMEOUT).await.unwrap();
        assert_eq!(qmp.execute("stop", None).await.unwrap(), json!({}));
        assert_eq!(qmp.query_status().await.unwrap(), QmpStatus { status: "paused".into(), running: false });
        let e = qmp.execute("nope", None).await.unwrap_err();
        assert!(matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (client, _server) = duplex(4096);
        let e = Qmp::handshake(client, Duration::from_millis(50)).await.err().unwrap();
        assert!(matches!(e, QmpError::Timeout { timeout_ms: 50 }), "{e}");
    }

    #[tokio::test]
    async fn a_wrong_greeting_or_huge_line_is_refused() {
        let (client, mut server) = duplex(4096);
        server.write_all(b"{\"hello\": 1}\n").await.unwrap();
        let e = Qmp::handshake(client, QMP_TIMEOUT).await.err().unwrap();
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");

        let (client, mut server) = duplex(64 * 1024);
        tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_QMP_MESSAGE / chunk.len() + 2) {
                if server.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let e = Qmp::handshake(client, QMP_TIMEOUT).await.err().unwrap();
        assert!(matches!(&e, QmpError::Protocol(m) if m.contains("longer")), "{e}");
    }
}
