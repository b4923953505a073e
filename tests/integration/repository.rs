//! The repository tests itself: a fresh clone with nothing beside it passes the README's test
//! command, so no test, fixture maker or script the tests run may read the folder that sits
//! beside the checkout on the project's own machines. Only the peers' harnesses (cpa-tools,
//! the loaders) may be used from there, by tools that skip with a message without them.

use std::path::{Path, PathBuf};

use crate::common::repo_root;

/// The scripts the README's test command runs (scripts/test.sh and what it calls).
const TEST_SCRIPTS: [&str; 5] =
    ["scripts/test.sh", "scripts/bootstrap.sh", "scripts/build.sh", "scripts/python.sh", ".ci/run"];

/// Every file under `dir`, recursively (fixtures' binary files included: a path can hide there
/// too, e.g. an HDF5 external link).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let cache = matches!(path.file_name().and_then(|n| n.to_str()), Some("__pycache__" | ".pytest_cache"));
        match entry.file_type() {
            Ok(t) if t.is_dir() && !cache => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The lines of `text` that name the sibling folder, other than its peers' harnesses.
fn outside_references(text: &str) -> Vec<String> {
    // Spelled in pieces so that this file does not name the folder itself.
    let sibling = ["..", "/", "shared"].concat();
    let python_path = ["/ ", "\"shared\""].concat();
    text.lines()
        .filter(|line| line.contains(&sibling) || line.contains(&python_path))
        .filter(|line| !line.contains("peer"))
        .map(|line| line.trim().to_owned())
        .collect()
}

#[test]
fn no_test_reads_outside_the_repository() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["tests", "python/tests"] {
        files_under(&root.join(dir), &mut files);
    }
    files.extend(TEST_SCRIPTS.iter().map(|s| root.join(s)));
    assert!(files.len() > 20, "found only {} files to check under {}", files.len(), root.display());
    let mut found = Vec::new();
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else { continue };
        for line in outside_references(&String::from_utf8_lossy(&bytes)) {
            found.push(format!("{}: {line}", file.strip_prefix(&root).unwrap_or(file).display()));
        }
    }
    assert!(found.is_empty(), "tests must read only files inside the repository:\n{}", found.join("\n"));
}

#[test]
fn the_check_finds_what_it_looks_for() {
    let sibling = ["..", "/", "shared"].concat();
    assert_eq!(outside_references(&format!("let p = \"{sibling}/data/x.h5ad\";")).len(), 1);
    assert_eq!(outside_references("DATA = REPO.parent / \"shared\" / \"data\"").len(), 1);
    assert!(outside_references(&format!("PEER = \"{sibling}/peer/cpa-tools\"")).is_empty());
    assert!(outside_references("let shared = Arc::new(x);").is_empty());
}
