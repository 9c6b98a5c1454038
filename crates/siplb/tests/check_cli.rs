//! `siplb check` as a user runs it: output lines and exit status.

use std::path::{Path, PathBuf};
use std::process::Command;

fn siplb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_siplb"))
}

fn sip_tests(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sip/tests")
        .join(rel)
}

#[test]
fn every_valid_torture_message_is_ok() {
    let dir = sip_tests("rfc4475/valid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = siplb().arg("check").args(&files).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(text.lines().count(), files.len());
    assert!(
        text.lines()
            .all(|l| l.starts_with("OK ") && l.contains(" call-id=")),
        "{text}"
    );
    assert!(text.contains("OK INVITE call-id=wsinv.ndaksdj@192.0.2.1"));
    assert!(text.contains("OK 200 call-id=unreason.1234ksdfak3j2erwedfsASdf"));
}

#[test]
fn a_bad_file_gives_a_reason_and_exit_1() {
    let good = sip_tests("rfc4475/valid/esc01.sip");
    let bad = sip_tests("rfc4475/invalid/badvers.sip");
    let out = siplb().arg("check").arg(&good).arg(&bad).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("OK INVITE call-id=esc01."));
    assert_eq!(
        lines[1],
        format!("ERROR {}: unsupported SIP version at line 1", bad.display())
    );
}

#[test]
fn unreadable_file_is_an_error_not_a_crash() {
    let out = siplb()
        .args(["check", "/nonexistent/x.sip"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ERROR /nonexistent/x.sip: cannot read")
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        siplb().arg("check").output().unwrap().status.code(),
        Some(2)
    );
    assert_eq!(
        siplb()
            .arg("no-such-command")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
}
