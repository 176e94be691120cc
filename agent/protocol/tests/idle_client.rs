//! An agent client waiting on a quiet connection sleeps: no wake-ups while a call is out (a
//! container's VM process waits on `WaitProcess` for the container's whole life). A process of
//! its own, so that its reader thread is the only one of its name.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use husk_agent_protocol::agent::WaitProcessRequest;
use husk_agent_protocol::client::AgentClient;

/// Context switches of this process's threads named `name`, and how many there are.
fn switches_of(name: &str) -> (u64, usize) {
    let mut total = 0;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() != name {
            continue;
        }
        threads += 1;
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
            .sum::<u64>();
    }
    (total, threads)
}

#[test]
fn a_client_waiting_for_an_answer_does_not_wake_up() {
    let (ours, mut agent) = UnixStream::pair().unwrap();
    let client = AgentClient::new(ours).unwrap();
    let caller = client.clone();
    let call = std::thread::spawn(move || {
        caller.wait_process(ttrpc::context::Context::default(), &WaitProcessRequest::new())
    });
    // The request arrives; nothing answers it.
    let mut header = [0u8; 10];
    agent.read_exact(&mut header).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (before, threads) = switches_of("agent-client");
    assert_eq!(threads, 1, "one reader thread");
    std::thread::sleep(Duration::from_secs(1));
    let (after, _) = switches_of("agent-client");
    // ttrpc's own client woke up every 10 ms: about a hundred here.
    assert!(after - before <= 2, "the reader woke {} times in a second", after - before);
    drop(agent);
    assert!(call.join().unwrap().is_err(), "the agent hung up");
}
