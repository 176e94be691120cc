//! The runc-compatible commands where no guest is needed: where the installed husk finds its
//! guest assets, the config file, the clear errors for bad bundles and unknown ids (in runc's
//! words and as JSON log lines), `spec`, `features`, `list`, `--version`; and that a failed
//! create leaves nothing under --root. (Containers in real guests: tests/e2e/runtime.)

use std::path::Path;
use std::process::{Command, Output, Stdio};

use husk_tests::tiny_guest::TempDir;

/// husk with a private root and log, and no guest assets from the environment.
fn husk(dir: &Path) -> Command {
    husk_at(Path::new(env!("CARGO_BIN_EXE_husk")), dir)
}

fn husk_at(binary: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_remove("HUSK_KERNEL")
        .env_remove("HUSK_INITRD")
        .env("HUSK_CONFIG", dir.join("config.toml"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--log")
        .arg(dir.join("log.json"))
        .args(["--log-format", "json"])
        .stdin(Stdio::null());
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("husk runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    stderr(&out)
}

/// Fake guest assets, enough to get past husk's settings.
fn fake_assets(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initrd"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&initrd, b"i").unwrap();
    (kernel, initrd)
}

#[test]
fn the_installed_layout_finds_its_guest_assets() {
    let dir = TempDir::new("cli-install");
    let prefix = dir.path().join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("share/husk")).unwrap();
    let binary = prefix.join("bin/husk");
    std::fs::copy(env!("CARGO_BIN_EXE_husk"), &binary).unwrap();
    let no_bundle = dir.path().join("no-bundle");

    let e = fails(husk_at(&binary, dir.path()).args(["create", "-b"]).arg(&no_bundle).arg("c"));
    assert!(e.contains("no guest kernel") && e.contains("prefix/share/husk/vmlinux"), "{e}");
    assert!(e.contains("HUSK_KERNEL"), "the error says how to set it: {e}");

    std::fs::write(prefix.join("share/husk/vmlinux"), b"k").unwrap();
    std::fs::write(prefix.join("share/husk/husk-guest.cpio.gz"), b"i").unwrap();
    let e = fails(husk_at(&binary, dir.path()).args(["create", "-b"]).arg(&no_bundle).arg("c"));
    assert!(e.contains("has no config.json"), "the assets were found: {e}");
}

#[test]
fn the_config_file_is_read_and_checked() {
    let dir = TempDir::new("cli-config");
    let (kernel, initrd) = fake_assets(dir.path());
    std::fs::write(
        dir.path().join("config.toml"),
        format!("kernel = {:?}\ninitrd = {:?}\n", kernel, initrd),
    )
    .unwrap();
    let e = fails(husk(dir.path()).args(["create", "-b", "/nonexistent", "c"]));
    assert!(e.contains("has no config.json"), "the config's kernel was taken: {e}");

    std::fs::write(dir.path().join("config.toml"), "kernal = \"/k\"\n").unwrap();
    let e = fails(husk(dir.path()).args(["create", "-b", "/nonexistent", "c"]));
    assert!(e.contains("config.toml is not valid") && e.contains("kernal"), "{e}");
}

#[test]
fn bad_bundles_fail_clearly_and_leave_nothing() {
    let dir = TempDir::new("cli-bundles");
    let (kernel, initrd) = fake_assets(dir.path());
    let create = |bundle: &Path| {
        let mut cmd = husk(dir.path());
        cmd.env("HUSK_KERNEL", &kernel).env("HUSK_INITRD", &initrd);
        cmd.args(["create", "--bundle"]).arg(bundle).arg("c1");
        fails(&mut cmd)
    };
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    assert!(create(&bundle).contains("has no config.json"));
    std::fs::write(bundle.join("config.json"), "[1,").unwrap();
    assert!(create(&bundle).contains("is not valid JSON"));
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
    )
    .unwrap();
    let e = create(&bundle);
    assert!(e.contains("rootfs does not exist"), "{e}");
    std::fs::create_dir(bundle.join("rootfs")).unwrap();
    let mut cmd = husk(dir.path());
    cmd.env("HUSK_KERNEL", &kernel).env("HUSK_INITRD", &initrd);
    let e = fails(cmd.args(["create", "--preserve-fds", "2", "--bundle"]).arg(&bundle).arg("c1"));
    assert!(e.contains("--preserve-fds"), "{e}");
    let e = fails(husk(dir.path()).args(["create", "--bundle"]).arg(&bundle).arg("../x"));
    assert!(e.contains("invalid container id"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("root"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing left under --root: {left:?}");
}

#[test]
fn unknown_ids_are_reported_as_runc_does() {
    let dir = TempDir::new("cli-unknown");
    for args in [
        &["state", "ghost"][..],
        &["start", "ghost"],
        &["kill", "ghost", "KILL"],
        &["delete", "ghost"],
        &["delete", "--force", "ghost"],
        &["exec", "ghost", "true"],
        &["ps", "ghost"],
        &["pause", "ghost"],
        &["resume", "ghost"],
        &["events", "--stats", "ghost"],
        &["update", "--pids-limit", "10", "ghost"],
    ] {
        let e = fails(husk(dir.path()).args(args));
        assert_eq!(e.trim(), "container \"ghost\" does not exist", "{args:?}");
    }
    let log = std::fs::read_to_string(dir.path().join("log.json")).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).expect("JSON log lines")).collect();
    assert_eq!(lines.len(), 11);
    for line in &lines {
        assert_eq!(line["level"], "error");
        assert_eq!(line["msg"], "container \"ghost\" does not exist");
        assert!(line["time"].is_string());
    }
    let e = fails(husk(dir.path()).args(["kill", "ghost", "SIGNOPE"]));
    assert!(e.contains("unknown signal"), "{e}");
}

#[test]
fn spec_features_list_and_version() {
    let dir = TempDir::new("cli-misc");
    let bundle = dir.path().join("b");
    std::fs::create_dir(&bundle).unwrap();
    let out = husk(dir.path()).args(["spec", "--bundle"]).arg(&bundle).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["root"]["path"], "rootfs");
    assert_eq!(spec["process"]["args"][0], "sh");
    let e = fails(husk(dir.path()).args(["spec", "--bundle"]).arg(&bundle));
    assert!(e.contains("exists"), "{e}");

    let out = husk(dir.path()).arg("features").output().unwrap();
    let features: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(features["ociVersionMin"], "1.0.0");
    assert_eq!(features["linux"]["cgroup"]["v2"], true);

    let out = husk(dir.path()).args(["list", "--format", "json"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "null\n");
    let out = husk(dir.path()).arg("list").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ID          PID"));

    let out = husk(dir.path()).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.starts_with("husk version ") && version.contains("spec: "), "{version}");
}

#[test]
fn delete_removes_what_a_dead_create_left() {
    let dir = TempDir::new("cli-dead-create");
    // A create killed before it saved its record leaves only its directory.
    std::fs::create_dir_all(dir.path().join("root/half")).unwrap();
    let out = husk(dir.path()).args(["delete", "half"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!dir.path().join("root/half").exists());
    let e = fails(husk(dir.path()).args(["delete", "half"]));
    assert!(e.contains("does not exist"), "{e}");
}
