//! Guests with several vCPUs restored from a VM template: every vCPU's state (registers, local
//! APIC and its timer, MP state) comes back, so the restored guest runs work, timers included,
//! on each of them. husk gives a guest no more vCPUs than its host has CPUs unless `max_vcpus`
//! says otherwise, as it does here: `make test-e2e` runs this suite in a nested test host with
//! one CPU (README.md of tests/nested: test hosts with two are not reliable), where the two
//! vCPUs take turns.

use std::io::Write;
use std::time::Duration;

use husk_tests::oci::{process, spec};
use husk_tests::runtime::{try_wait_pid, Husk};
use serde_json::json;

/// The guest's CPU count and online CPUs, then a sleep and an echo pinned to each CPU in turn
/// (a CPU that did not come back, or whose timer did not, never finishes its sleep: `timeout`
/// ends it and its line is missing).
const SCRIPT: &str = "nproc; cat /sys/devices/system/cpu/online; \
    for c in 0 1; do timeout 30 taskset -c $c sh -c \"sleep 0.2; echo on $c\"; done";

#[test]
fn a_two_vcpu_guest_restored_from_its_template_works_on_both_vcpus() {
    let husk = Husk::new();
    let mut husk_config =
        std::fs::OpenOptions::new().append(true).open(husk.dir().join("config.toml")).unwrap();
    writeln!(husk_config, "max_vcpus = 2").unwrap();
    let mut config = spec(process(&["sh", "-c", SCRIPT]));
    config["linux"]["resources"]["cpu"] = json!({"quota": 200000, "period": 100000});
    let bundle = husk.bundle_with("smp", config);
    for id in ["first", "second"] {
        // A guest that hangs (a vCPU that never answers an IPI) must fail the test, not stall it.
        let stdout = husk.dir().join(format!("{id}.out"));
        let mut vm_process = husk
            .cmd(&["run", "--bundle", bundle.to_str().unwrap(), id])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .spawn()
            .unwrap();
        // Reaped here, by pid, with a deadline (std's wait has none); a guest that hangs is
        // shown by its console (a stalled CPU's report) while its VM still runs, then stopped.
        let code =
            try_wait_pid(vm_process.id() as i32, Duration::from_secs(120)).unwrap_or_else(|| {
                let logs = husk.logs();
                let _ = vm_process.kill().and_then(|()| vm_process.wait());
                panic!("{id}: no exit within 120 s: {logs}")
            });
        assert_eq!(code, 0, "{id}: {}", husk.logs());
        let out = std::fs::read_to_string(&stdout).unwrap();
        assert_eq!(out, "2\n0-1\non 0\non 1\n", "{id}");
    }
    let log = std::fs::read_to_string(husk.log()).unwrap();
    assert_eq!(log.matches("micro-VM built in").count(), 1, "only the template booted: {log}");
    assert_eq!(log.matches("micro-VM restored").count(), 2, "{log}");
    husk.assert_nothing_left();
}
