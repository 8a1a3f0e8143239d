//! The README's management walkthrough is real output of today's binary: `scripts/walkthrough.sh`
//! runs it against a fresh node and prints the transcript, which must equal the README's block
//! between the walkthrough markers. Regenerate the block with `scripts/walkthrough.sh` when the
//! output changes on purpose.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn the_readme_walkthrough_is_what_the_binary_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("timeout")
        .args(["-k", "5", "120"])
        .arg(root.join("scripts/walkthrough.sh"))
        .arg(BIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "walkthrough.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let begin = readme
        .find("<!-- walkthrough:begin")
        .expect("the README has a walkthrough block");
    let block = &readme[begin..];
    let block = &block[block.find("```\n").unwrap() + 4..];
    let want = &block[..block.find("```\n<!-- walkthrough:end -->").unwrap()];
    if got != want {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .enumerate()
            .filter(|(_, (w, g))| w != g)
            .take(10)
            .map(|(i, (w, g))| format!("line {}:\n  README: {w}\n  binary: {g}", i + 1))
            .collect();
        panic!(
            "the README walkthrough and the binary disagree ({} vs {} lines); regenerate with \
             scripts/walkthrough.sh:\n{}",
            want.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
}
