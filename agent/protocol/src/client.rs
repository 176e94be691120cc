//! The host's ttrpc client for the agent service: requests on one connection, answered in any
//! order, matched by their stream ids (the ttrpc wire format: a 10-byte header, then a
//! protobuf `Request` or `Response`).
//!
//! ttrpc's own blocking client polls its socket with a 10 ms timeout in a loop, to notice when
//! its last handle is dropped; a container's VM process keeps its connection to the agent for
//! the container's whole life, so that was a hundred wake-ups a second for every idle
//! container. Here the reader blocks in `read` until a response arrives or the connection is
//! shut down, which dropping the last handle does. Whatever the guest sends is checked like any
//! other guest input: a length over ttrpc's message limit or a response that does not parse
//! ends the connection or fails the call, never the host.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use protobuf::Message;
use ttrpc::context::Context;
use ttrpc::proto::{
    Code, MessageHeader, Request, Response, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX,
    MESSAGE_TYPE_RESPONSE,
};
use ttrpc::{Error, Result};

use crate::agent as pb;

/// The service name the agent registers its methods under (`proto/agent.proto`'s package and
/// service).
const SERVICE: &str = "husk.agent.v1.Agent";

/// Calls waiting for their responses, by stream id; `closed` once the connection is gone.
#[derive(Default)]
struct Waiting {
    calls: HashMap<u32, SyncSender<Result<Vec<u8>>>>,
    closed: Option<String>,
}

/// The state the callers and the reader thread share.
struct Shared {
    waiting: Mutex<Waiting>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection is gone: every waiting call fails with `why`, and so does every later one.
    fn close(&self, why: String) {
        let mut w = self.lock();
        for (_, call) in w.calls.drain() {
            let _ = call.send(Err(Error::Socket(why.clone())));
        }
        w.closed = Some(why);
    }
}

/// One connection; shut down (which ends its reader) when the last client handle goes.
struct Connection {
    stream: UnixStream,
    writing: Mutex<()>,
    next_stream_id: AtomicU32,
    shared: Arc<Shared>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// A client of the agent service on one connection; clones share it, and calls from several
/// threads may wait at once (a `WaitProcess` while another thread sends a signal).
#[derive(Clone)]
pub struct AgentClient {
    connection: Arc<Connection>,
}

impl AgentClient {
    /// A client on `stream`, a connection to the agent's ttrpc port, which it takes over.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let reader = stream.try_clone()?;
        let shared = Arc::new(Shared { waiting: Mutex::default() });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("agent-client".into())
            .spawn(move || read_responses(reader, &theirs))?;
        Ok(AgentClient {
            connection: Arc::new(Connection {
                stream,
                writing: Mutex::new(()),
                next_stream_id: AtomicU32::new(1),
                shared,
            }),
        })
    }

    /// Send `method` with `req` and wait for its response, for at most the context's timeout
    /// when it has one.
    fn call<Resp: Message>(&self, ctx: Context, method: &str, req: &impl Message) -> Result<Resp> {
        let mut request = Request::new();
        request.service = SERVICE.into();
        request.method = method.into();
        request.timeout_nano = ctx.timeout_nano;
        request.metadata = ttrpc::context::to_pb(ctx.metadata);
        request.payload = req.write_to_bytes().map_err(|e| others("encoding the request", e))?;
        let body = request.write_to_bytes().map_err(|e| others("encoding the request", e))?;
        if body.len() > MESSAGE_LENGTH_MAX {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INVALID_ARGUMENT,
                format!("the request is {} bytes, over ttrpc's {MESSAGE_LENGTH_MAX}", body.len()),
            )));
        }
        let c = &self.connection;
        // Client-initiated streams have odd ids.
        let id = c.next_stream_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut w = c.shared.lock();
            if let Some(why) = &w.closed {
                return Err(Error::Socket(why.clone()));
            }
            w.calls.insert(id, tx);
        }
        let header: Vec<u8> = MessageHeader::new_request(id, body.len() as u32).into();
        let sent = {
            let _one_writer = c.writing.lock().unwrap_or_else(|e| e.into_inner());
            (&c.stream).write_all(&header).and_then(|()| (&c.stream).write_all(&body))
        };
        if let Err(e) = sent {
            c.shared.lock().calls.remove(&id);
            return Err(Error::Socket(format!("sending {method}: {e}")));
        }
        let answer = match ctx.timeout_nano {
            n if n > 0 => rx.recv_timeout(Duration::from_nanos(n as u64)).map_err(|e| match e {
                RecvTimeoutError::Timeout => {
                    c.shared.lock().calls.remove(&id);
                    Error::Others(format!(
                        "{method}: no response in {:?}",
                        Duration::from_nanos(n as u64)
                    ))
                }
                RecvTimeoutError::Disconnected => Error::Socket("the connection closed".into()),
            })?,
            _ => rx.recv().map_err(|_| Error::Socket("the connection closed".into()))?,
        };
        let response =
            Response::parse_from_bytes(&answer?).map_err(|e| others("a malformed response", e))?;
        if let Some(status) = response.status.as_ref().filter(|s| s.code() != Code::OK) {
            return Err(Error::RpcStatus(status.clone()));
        }
        Resp::parse_from_bytes(&response.payload)
            .map_err(|e| others(&format!("a malformed {method} response"), e))
    }
}

fn others(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Others(format!("{what}: {e}"))
}

/// The reader thread: hand each response to the call waiting for its stream id, until the
/// connection ends or the guest breaks the protocol.
fn read_responses(mut stream: UnixStream, shared: &Shared) {
    let why = loop {
        let mut header = [0u8; MESSAGE_HEADER_LENGTH];
        if let Err(e) = stream.read_exact(&mut header) {
            break describe_read_error(e);
        }
        let header = MessageHeader::from(&header[..]);
        let length = header.length as usize;
        if length > MESSAGE_LENGTH_MAX {
            break format!(
                "the agent sent a {length}-byte message, over ttrpc's {MESSAGE_LENGTH_MAX}"
            );
        }
        let mut body = vec![0u8; length];
        if let Err(e) = stream.read_exact(&mut body) {
            break describe_read_error(e);
        }
        if header.type_ != MESSAGE_TYPE_RESPONSE {
            continue;
        }
        // A response nobody waits for (its call timed out) is dropped.
        if let Some(call) = shared.lock().calls.remove(&header.stream_id) {
            let _ = call.send(Ok(body));
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    shared.close(why);
}

fn describe_read_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the agent closed the connection".into(),
        _ => format!("reading from the agent: {e}"),
    }
}

/// The service's methods, named as ttrpc-codegen names them, with the same signatures.
macro_rules! methods {
    ($($name:ident($method:literal, $req:ident) -> $resp:ident;)*) => {
        impl AgentClient {
            $(
                #[doc = concat!("The `", $method, "` call.")]
                pub fn $name(&self, ctx: Context, req: &pb::$req) -> Result<pb::$resp> {
                    self.call(ctx, $method, req)
                }
            )*
        }
    };
}

methods! {
    check("Check", CheckRequest) -> CheckResponse;
    version("Version", VersionRequest) -> VersionResponse;
    create_container("CreateContainer", CreateContainerRequest) -> Empty;
    start_container("StartContainer", StartContainerRequest) -> Empty;
    exec_process("ExecProcess", ExecProcessRequest) -> Empty;
    signal_process("SignalProcess", SignalProcessRequest) -> Empty;
    wait_process("WaitProcess", WaitProcessRequest) -> WaitProcessResponse;
    close_stdin("CloseStdin", CloseStdinRequest) -> Empty;
    tty_win_resize("TtyWinResize", TtyWinResizeRequest) -> Empty;
    list_processes("ListProcesses", ListProcessesRequest) -> ListProcessesResponse;
    remove_process("RemoveProcess", RemoveProcessRequest) -> Empty;
    remove_container("RemoveContainer", RemoveContainerRequest) -> Empty;
    pause_container("PauseContainer", PauseContainerRequest) -> Empty;
    resume_container("ResumeContainer", ResumeContainerRequest) -> Empty;
    stats_container("StatsContainer", StatsContainerRequest) -> StatsContainerResponse;
    update_container("UpdateContainer", UpdateContainerRequest) -> Empty;
    update_interface("UpdateInterface", UpdateInterfaceRequest) -> Empty;
    update_routes("UpdateRoutes", UpdateRoutesRequest) -> Empty;
    set_hostname("SetHostname", SetHostnameRequest) -> Empty;
    set_time("SetTime", SetTimeRequest) -> Empty;
    add_entropy("AddEntropy", AddEntropyRequest) -> Empty;
    shutdown("Shutdown", ShutdownRequest) -> Empty;
}

#[cfg(test)]
mod tests;
