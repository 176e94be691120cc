//! The guest boots to userspace, sees the vCPUs and memory it was given, and its reboot ends
//! `husk vm run` with exit status 0.

use husk_tests::guest::GuestVm;

#[test]
fn guest_boots_to_userspace_and_reboot_exits_zero() {
    let result = GuestVm::new("e2e-boot").run();
    assert!(result.status.success(), "{result:#?}");
    assert!(result.console.contains("HUSK-GUEST-UP"), "{result:#?}");
    assert_eq!(result.value("nproc").as_deref(), Some("1"), "{result:#?}");
}

#[test]
fn guest_sees_two_vcpus_and_256_mib() {
    let result = GuestVm::new("e2e-size")
        .args(&["--vcpus", "2", "--mem-mib", "256"])
        .run();
    assert!(result.status.success(), "{result:#?}");
    assert_eq!(result.value("nproc").as_deref(), Some("2"), "{result:#?}");
    let mem_kib: u64 = result
        .console
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {result:#?}"));
    // The kernel keeps its own image and reserved memory out of MemTotal.
    assert!(
        (200 * 1024..=256 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB for 256 MiB"
    );
}
