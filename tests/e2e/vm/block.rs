//! virtio-blk end to end: what the guest writes is on the host's image file afterwards, and a
//! read-only disk refuses writes while its file stays untouched.

use husk_tests::guest::GuestVm;

/// The file's SHA-256, from the host's sha256sum.
fn host_sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("a digest").to_owned()
}

/// The pattern the guest writes: `husk-block-NNNNNN\n` lines, 1 MiB of them.
fn pattern() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 << 20);
    let mut n = 0;
    while bytes.len() < 1 << 20 {
        bytes.extend_from_slice(format!("husk-block-{n:06}\n").as_bytes());
        n += 1;
    }
    bytes.truncate(1 << 20);
    bytes
}

#[test]
fn guest_writes_reach_the_image_file() {
    let guest = GuestVm::new("e2e-block-rw");
    let image = guest.dir().join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    // Write the pattern at 1 MiB into the disk, bypassing the page cache, and read it back.
    let result = guest
        .args(&["--disk", image.to_str().unwrap()])
        .script(
            "awk 'BEGIN { for (i = 0; i < 58255; i++) printf \"husk-block-%06d\\n\", i }' \
               | head -c 1048576 > /tmp/pattern\n\
             dd if=/tmp/pattern of=/dev/vda bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null\n\
             echo \"readback=$(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n\
             echo \"written=$(sha256sum < /tmp/pattern | cut -d' ' -f1)\"",
        )
        .run();
    result.assert_success();
    assert_eq!(result.value("written"), result.value("readback"), "{result:#?}");
    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[1 << 20..2 << 20], pattern().as_slice(), "the host sees what the guest wrote");
    assert!(file[..1 << 20].iter().all(|&b| b == 0), "nothing written before the range");
    assert!(file[2 << 20..].iter().all(|&b| b == 0), "nothing written after the range");
}

#[test]
fn read_only_disk_refuses_writes_and_its_file_is_unchanged() {
    let guest = GuestVm::new("e2e-block-ro");
    let image = guest.dir().join("ro.img");
    let content: Vec<u8> =
        (0..2u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let before = std::fs::metadata(&image).unwrap().modified().unwrap();
    let result = guest
        .args(&["--disk", &format!("{},ro", image.display())])
        .script(
            "echo \"ro=$(cat /sys/block/vda/ro)\"\n\
             if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null; then \
               echo write=accepted; else echo write=refused; fi\n\
             echo \"sha=$(sha256sum < /dev/vda | cut -d' ' -f1)\"",
        )
        .run();
    result.assert_success();
    assert_eq!(result.value("ro").as_deref(), Some("1"), "{result:#?}");
    assert_eq!(result.value("write").as_deref(), Some("refused"), "{result:#?}");
    assert_eq!(std::fs::read(&image).unwrap(), content, "the file is unchanged");
    assert_eq!(std::fs::metadata(&image).unwrap().modified().unwrap(), before);
    assert_eq!(result.value("sha"), Some(host_sha256(&image)), "the guest read the file's bytes");
}
