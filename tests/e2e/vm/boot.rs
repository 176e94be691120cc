//! The guest boots to userspace, sees the vCPUs and memory it was given, and its reboot ends
//! `husk vm run` with exit status 0.

use husk_tests::guest::{bzimage_kernel, GuestVm};

#[test]
fn guest_boots_to_userspace_and_reboot_exits_zero() {
    let result = GuestVm::new("e2e-boot").run();
    assert!(result.status.success(), "{result:#?}");
    assert!(result.console.contains("HUSK-GUEST-UP"), "{result:#?}");
    assert_eq!(result.value("nproc").as_deref(), Some("1"), "{result:#?}");
}

#[test]
fn guest_sees_two_vcpus_and_256_mib() {
    let result = GuestVm::new("e2e-size").args(&["--vcpus", "2", "--mem-mib", "256"]).run();
    assert!(result.status.success(), "{result:#?}");
    assert_eq!(result.value("nproc").as_deref(), Some("2"), "{result:#?}");
    let mem_kib: u64 = result
        .console
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {result:#?}"));
    // The kernel keeps its own image and reserved memory out of MemTotal.
    assert!((200 * 1024..=256 * 1024).contains(&mem_kib), "MemTotal {mem_kib} kB for 256 MiB");
}

#[test]
fn a_bzimage_boots_to_userspace() {
    let kernel = bzimage_kernel();
    let result = GuestVm::new("e2e-bzimage")
        .kernel(kernel.clone())
        .args(&["--mem-mib", "256"])
        .script("echo \"kernel=$(uname -r)\"")
        .run();
    result.assert_success();
    let release = result.value("kernel").unwrap_or_default();
    let file_name = kernel.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        file_name.ends_with(&release) && !release.is_empty(),
        "{file_name} booted as {release:?}"
    );
}
