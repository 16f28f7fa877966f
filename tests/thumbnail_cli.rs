//! The `downloader thumbnail` subcommand.

use std::process::Command;

fn fixture(name: &str) -> String {
    format!("{}/fixtures/thumbnail/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_downloader"))
}

#[test]
fn keeps_going_after_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "thumbnail",
            "--width",
            "64",
            "--height",
            "64",
            "--jobs",
            "2",
            "--output",
        ])
        .arg(dir.path())
        .args([
            fixture("photo.jpg"),
            fixture("truncated.jpg"),
            fixture("rgba.png"),
            fixture("nope.jpg"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("ok  ")).count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("truncated.jpg: truncated JPEG"), "{stdout}");
    assert!(stdout.contains("nope.jpg: cannot read"), "{stdout}");
    assert!(stdout.contains("64x48"), "{stdout}");
    let made = image::open(dir.path().join("photo.jpg")).unwrap();
    assert_eq!((made.width(), made.height()), (64, 48));
    assert!(dir.path().join("rgba.jpg").exists());
}

#[test]
fn all_ok_exits_zero_with_format() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "thumbnail",
            "--width",
            "32",
            "--height",
            "32",
            "--format",
            "same",
            "--fit",
            "cover",
            "--output",
        ])
        .arg(dir.path())
        .args([fixture("photo.webp"), fixture("static.gif")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(dir.path().join("photo.webp").exists());
    assert!(dir.path().join("static.gif").exists());
}

#[test]
fn bad_arguments_exit_two() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = bin()
        .args(["thumbnail", "--width", "32", "--height", "32", "--output"])
        .arg(&file)
        .arg(fixture("photo.jpg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--output"));
    let out = bin()
        .args(["thumbnail", "--width", "0", "--height", "32", "--output"])
        .arg(dir.path())
        .arg(fixture("photo.jpg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--width"));
    let out = bin()
        .args([
            "thumbnail",
            "--width",
            "10",
            "--height",
            "32",
            "--fit",
            "zoom",
            "--output",
        ])
        .arg(dir.path())
        .arg(fixture("photo.jpg"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fit"));
}
