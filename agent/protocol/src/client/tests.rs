//! The client against a peer the test plays, byte for byte: answers out of order, late, never,
//! or hostile. (The agent's own tests drive every method against the real ttrpc server.)

use super::*;

/// The agent's end of a client's connection.
struct Peer {
    stream: UnixStream,
}

impl Peer {
    fn pair() -> (AgentClient, Peer) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (AgentClient::new(ours).unwrap(), Peer { stream: theirs })
    }

    /// The next request: its stream id and the request itself.
    fn request(&mut self) -> (u32, Request) {
        let mut header = [0u8; MESSAGE_HEADER_LENGTH];
        self.stream.read_exact(&mut header).unwrap();
        let header = MessageHeader::from(&header[..]);
        assert_eq!(header.type_, ttrpc::proto::MESSAGE_TYPE_REQUEST);
        let mut body = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut body).unwrap();
        (header.stream_id, Request::parse_from_bytes(&body).unwrap())
    }

    fn send_raw(&mut self, id: u32, type_: u8, body: &[u8]) {
        let mut header = MessageHeader::new_response(id, body.len() as u32);
        header.type_ = type_;
        let header: Vec<u8> = header.into();
        self.stream.write_all(&header).unwrap();
        self.stream.write_all(body).unwrap();
    }

    fn answer(&mut self, id: u32, payload: &impl Message) {
        let mut response = Response::new();
        response.payload = payload.write_to_bytes().unwrap();
        self.send_raw(id, MESSAGE_TYPE_RESPONSE, &response.write_to_bytes().unwrap());
    }
}

fn wait_request(container: &str) -> pb::WaitProcessRequest {
    let mut req = pb::WaitProcessRequest::new();
    req.container_id = container.into();
    req
}

fn exit_status(status: i32) -> pb::WaitProcessResponse {
    let mut resp = pb::WaitProcessResponse::new();
    resp.exit_status = status;
    resp
}

#[test]
fn calls_waiting_at_once_get_their_own_answers_in_any_order() {
    let (client, mut peer) = Peer::pair();
    let (a, b) = (client.clone(), client.clone());
    let first = std::thread::spawn(move || a.wait_process(Context::default(), &wait_request("a")));
    let (id_a, req_a) = peer.request();
    let second = std::thread::spawn(move || b.wait_process(Context::default(), &wait_request("b")));
    let (id_b, req_b) = peer.request();
    assert_eq!((req_a.service.as_str(), req_a.method.as_str()), (SERVICE, "WaitProcess"));
    assert_ne!(id_a, id_b);
    assert_eq!(id_a % 2, 1, "client streams have odd ids");
    let container = |r: &Request| pb::WaitProcessRequest::parse_from_bytes(&r.payload).unwrap();
    assert_eq!(container(&req_a).container_id, "a");
    assert_eq!(container(&req_b).container_id, "b");
    // Answered the other way round; a data frame for a stream of its own in between is skipped.
    peer.answer(id_b, &exit_status(2));
    peer.send_raw(id_b + 100, ttrpc::proto::MESSAGE_TYPE_DATA, b"ignored");
    peer.answer(id_a, &exit_status(1));
    assert_eq!(first.join().unwrap().unwrap().exit_status, 1);
    assert_eq!(second.join().unwrap().unwrap().exit_status, 2);
}

#[test]
fn a_status_is_the_agents_error_and_a_timeout_leaves_the_connection_usable() {
    let (client, mut peer) = Peer::pair();
    let caller = client.clone();
    let call = std::thread::spawn(move || {
        caller.check(ttrpc::context::with_timeout(50_000_000), &pb::CheckRequest::new())
    });
    let (late, req) = peer.request();
    assert_eq!(req.timeout_nano, 50_000_000, "the agent is told the deadline");
    match call.join().unwrap() {
        Err(Error::Others(msg)) => assert!(msg.contains("no response"), "{msg}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Its answer comes after all, and is dropped; the next call gets its own.
    peer.answer(late, &pb::CheckResponse::new());
    let caller = client.clone();
    let call =
        std::thread::spawn(move || caller.check(Context::default(), &pb::CheckRequest::new()));
    let (id, _) = peer.request();
    let mut response = Response::new();
    response.status.mut_or_insert_default().code = Code::NOT_FOUND.into();
    response.status.mut_or_insert_default().message = "no such container".into();
    peer.send_raw(id, MESSAGE_TYPE_RESPONSE, &response.write_to_bytes().unwrap());
    match call.join().unwrap() {
        Err(Error::RpcStatus(s)) => {
            assert_eq!((s.code(), s.message()), (Code::NOT_FOUND, "no such container"))
        }
        other => panic!("expected the agent's status, got {other:?}"),
    }
}

#[test]
fn an_oversized_or_garbled_answer_fails_the_call_never_the_host() {
    let (client, mut peer) = Peer::pair();
    let caller = client.clone();
    let call =
        std::thread::spawn(move || caller.check(Context::default(), &pb::CheckRequest::new()));
    let (id, _) = peer.request();
    peer.send_raw(id, MESSAGE_TYPE_RESPONSE, b"\xff\xff not a protobuf");
    match call.join().unwrap() {
        Err(Error::Others(msg)) => assert!(msg.contains("malformed"), "{msg}"),
        other => panic!("expected a malformed response, got {other:?}"),
    }
    // A header claiming 64 MiB: the connection ends rather than anything being read into it.
    let caller = client.clone();
    let call =
        std::thread::spawn(move || caller.check(Context::default(), &pb::CheckRequest::new()));
    let (id, _) = peer.request();
    let header: Vec<u8> = MessageHeader::new_response(id, 64 << 20).into();
    peer.stream.write_all(&header).unwrap();
    match call.join().unwrap() {
        Err(Error::Socket(msg)) => assert!(msg.contains("over ttrpc's"), "{msg}"),
        other => panic!("expected the connection to end, got {other:?}"),
    }
    match client.check(Context::default(), &pb::CheckRequest::new()) {
        Err(Error::Socket(msg)) => assert!(msg.contains("over ttrpc's"), "{msg}"),
        other => panic!("later calls fail at once, got {other:?}"),
    }
}

#[test]
fn the_last_handle_dropped_closes_the_connection() {
    let (client, mut peer) = Peer::pair();
    let other = client.clone();
    drop(client);
    peer.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut byte = [0u8; 1];
    assert!(peer.stream.read(&mut byte).is_err(), "a clone still holds it open");
    drop(other);
    peer.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(peer.stream.read(&mut byte).unwrap(), 0, "the agent sees the connection end");
}

#[test]
fn an_agent_that_hangs_up_fails_the_waiting_call() {
    let (client, mut peer) = Peer::pair();
    let caller = client.clone();
    let call =
        std::thread::spawn(move || caller.wait_process(Context::default(), &wait_request("a")));
    peer.request();
    drop(peer);
    match call.join().unwrap() {
        Err(Error::Socket(msg)) => assert!(msg.contains("closed"), "{msg}"),
        other => panic!("expected the connection to end, got {other:?}"),
    }
}
