//! The house rules of the source tree, checked: no circles between the modules of `pipeline` or
//! `stages` (at every level, a module never uses a sibling that uses it back, directly or round
//! a loop), the commands of `pipeline` never use one another, threads are started by the crew
//! alone, and no file of the crates or of the Python package grows past 1,000 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::repo_root;

/// A module's path inside its crate (`["evaluate", "truth"]`; the crate root is empty).
type ModulePath = Vec<String>;

/// Where a use of another module was seen: the file and line.
type Seen = (PathBuf, usize);

/// Every module file of the crate whose `src` is `src`, by module path.
fn modules(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut found = BTreeMap::new();
    for path in files_under(&[src.to_owned()], &["rs"]) {
        let relative = path.strip_prefix(src).unwrap_or(&path).with_extension("");
        let mut parts: ModulePath = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
            parts.pop();
        }
        found.insert(parts, path);
    }
    found
}

/// Every file under `dirs` (recursively) whose extension is one of `extensions`, sorted.
fn files_under(dirs: &[PathBuf], extensions: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| extensions.iter().any(|x| e == *x)) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The code of a file without its comments and its `#[cfg(test)]` module (tests may use what
/// they test from anywhere).
fn code_of(text: &str) -> Vec<(usize, String)> {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let code = match line.find("//") {
                Some(at) if !line[..at].contains('"') => &line[..at],
                _ => line,
            };
            (i + 1, code.to_owned())
        })
        .collect()
}

/// The paths a use tree names: `crate::{a::B, c::{D, E}}` gives `crate::a::B`, `crate::c::D`,
/// `crate::c::E`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let mut inner = &tree[open + 1..];
    if let Some(close) = inner.rfind('}') {
        inner = &inner[..close];
    }
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).flat_map(|p| expand(&format!("{prefix}{p}"))).collect()
}

/// The `crate::`, `super::` and `self::` paths a file's code names, with their lines.
fn paths_named(code: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (line, text) in code {
        let trimmed = text.trim_start();
        let use_start =
            ["use ", "pub use ", "pub(crate) use ", "pub(super) use "].iter().find_map(|p| trimmed.strip_prefix(p));
        match (&mut pending, use_start) {
            (Some((_, tree)), _) => tree.push_str(text),
            (None, Some(rest)) => pending = Some((*line, rest.to_owned())),
            (None, None) => {}
        }
        if let Some((at, tree)) = pending.take() {
            match tree.find(';') {
                Some(end) => out.extend(expand(&tree[..end]).into_iter().map(|p| (at, p))),
                None => pending = Some((at, tree)),
            }
            if pending.is_some() {
                continue;
            }
        }
        // Paths written inline (`crate::plots::write(...)`, `super::Options`).
        for start in ["crate::", "super::", "self::"] {
            let mut from = 0;
            while let Some(at) = text[from..].find(start) {
                let begin = from + at;
                let before = text[..begin].chars().next_back();
                let path: String =
                    text[begin..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':')) && !trimmed.starts_with("use ")
                {
                    out.push((*line, path.clone()));
                }
                from = begin + path.len().max(1);
            }
        }
    }
    out
}

/// The module a path names from `module` (the longest known module it starts with), if any.
fn resolve(module: &ModulePath, path: &str, known: &BTreeMap<ModulePath, PathBuf>) -> Option<ModulePath> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: ModulePath = match segments.first() {
        Some(&"crate") => Vec::new(),
        Some(&"self") => module.clone(),
        Some(&"super") => {
            let mut base = module.clone();
            while segments.first() == Some(&"super") {
                // `super` of `a/b.rs` and of `a/b/mod.rs` is `a`.
                base.pop();
                segments.remove(0);
            }
            segments.insert(0, "super");
            base
        }
        _ => return None,
    };
    for s in segments.into_iter().skip(1) {
        base.push(s.to_owned());
    }
    while !base.is_empty() && !known.contains_key(&base) {
        base.pop();
    }
    Some(base)
}

/// Every use of one module by another in the crate at `src`: (user, used) -> where first seen.
fn uses(src: &Path) -> BTreeMap<(ModulePath, ModulePath), Seen> {
    let known = modules(src);
    let mut edges = BTreeMap::new();
    for (module, file) in &known {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for (line, path) in paths_named(&code_of(&text)) {
            if let Some(used) = resolve(module, &path, &known)
                && &used != module
            {
                edges.entry((module.clone(), used)).or_insert_with(|| (file.clone(), line));
            }
        }
    }
    edges
}

/// The loops among siblings: at each level, a module's use of another below the same parent
/// (neither inside the other) is an edge between the two children of that parent; a strongly
/// connected set of two or more children is a circle. Returns each circle with one use per edge.
fn circles(edges: &BTreeMap<(ModulePath, ModulePath), Seen>) -> Vec<Vec<String>> {
    let mut levels: BTreeMap<ModulePath, BTreeMap<String, BTreeMap<String, Seen>>> = BTreeMap::new();
    for ((from, to), seen) in edges {
        let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue; // a parent and its child
        }
        let parent: ModulePath = from[..common].to_vec();
        levels
            .entry(parent)
            .or_default()
            .entry(from[common].clone())
            .or_default()
            .entry(to[common].clone())
            .or_insert_with(|| seen.clone());
    }
    let mut found = Vec::new();
    for (parent, graph) in &levels {
        // Reachability by repeated search: the graphs have tens of nodes.
        let reach = |start: &str| -> BTreeSet<String> {
            let mut seen = BTreeSet::new();
            let mut stack = vec![start.to_owned()];
            while let Some(n) = stack.pop() {
                for next in graph.get(&n).map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
                    if seen.insert(next.clone()) {
                        stack.push(next);
                    }
                }
            }
            seen
        };
        let mut done = BTreeSet::new();
        for node in graph.keys() {
            if done.contains(node) || !reach(node).contains(node) {
                continue;
            }
            let members: BTreeSet<String> =
                reach(node).into_iter().filter(|other| reach(other).contains(node)).collect();
            let mut described = Vec::new();
            for a in &members {
                for (b, (file, line)) in graph.get(a).into_iter().flatten() {
                    if members.contains(b) {
                        let at = file.strip_prefix(repo_root()).unwrap_or(file).display().to_string();
                        described.push(format!("{}{a} -> {b} ({at}:{line})", prefix(parent)));
                    }
                }
            }
            done.extend(members);
            found.push(described);
        }
    }
    found
}

fn prefix(parent: &ModulePath) -> String {
    if parent.is_empty() { String::new() } else { format!("{}::", parent.join("::")) }
}

#[test]
fn no_module_of_pipeline_or_stages_goes_round_in_a_circle() {
    let mut found = Vec::new();
    for krate in ["pipeline", "stages", "engine"] {
        let src = repo_root().join(krate).join("src");
        let edges = uses(&src);
        assert!(edges.len() > 30, "{krate}: only {} uses between modules found", edges.len());
        found.extend(circles(&edges).into_iter().map(|c| format!("{krate}: {}", c.join("\n  "))));
    }
    assert!(found.is_empty(), "modules that use each other:\n{}", found.join("\n\n"));
}

/// The commands of `pipeline` and `engine` (the command registry's library modules): what they
/// share lives in the modules below them, never in another command.
#[test]
fn the_commands_never_use_one_another() {
    let commands: Vec<&str> =
        cpa_stream::unstable::pipeline::commands::COMMANDS.iter().filter_map(|k| k.module).collect();
    assert_eq!(commands.len(), 10, "{commands:?}");
    for module in &commands {
        let found = ["pipeline/src", "engine/src"].iter().any(|src| repo_root().join(src).join(module).is_dir());
        assert!(found, "the registry's module {module} is not a folder of pipeline/src or engine/src");
    }
    let mut edges = uses(&repo_root().join("pipeline/src"));
    edges.extend(uses(&repo_root().join("engine/src")));
    let crossing: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| {
            let (a, b) = (from.first().map(String::as_str), to.first().map(String::as_str));
            a != b && a.is_some_and(|a| commands.contains(&a)) && b.is_some_and(|b| commands.contains(&b))
        })
        .map(|((from, to), (file, line))| {
            format!("{} -> {} ({}:{line})", from.join("::"), to.join("::"), file.display())
        })
        .collect();
    assert!(crossing.is_empty(), "commands using another command:\n{}", crossing.join("\n"));
}

/// Only the engine links libtorch: the crates beneath it, and so the `cpa-stream` front, do not
/// depend on tch or torch-sys (the front's start without libtorch is checked in `link.rs`).
#[test]
fn only_the_engine_depends_on_libtorch() {
    for krate in ["schemas", "stages", "pipeline"] {
        let manifest = std::fs::read_to_string(repo_root().join(krate).join("Cargo.toml")).unwrap();
        for line in manifest.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let name = line.split(['=', '.', ' ']).next().unwrap_or("");
            assert!(!matches!(name, "tch" | "torch-sys"), "{krate}/Cargo.toml depends on libtorch: {line}");
        }
    }
}

/// Every crate the Python module's build (maturin, `python/Cargo.toml` alone) compiles is
/// compiled by the workspace's build with the same features (scripts/build.sh), so the module's
/// build reuses them: a feature set that differs makes the crate, and every crate above it,
/// compile twice on a cold CI run. Fixed by a `unify-` line in python/Cargo.toml. Skipped, with
/// the reason, where `cargo tree` cannot run offline.
#[test]
fn the_python_module_compiles_no_crate_the_workspace_build_compiled_otherwise() {
    let Some(workspace) = cargo_tree(&["--workspace", "-e", "normal,build,dev"]) else { return };
    let Some(module) = cargo_tree(&["--manifest-path", "python/Cargo.toml", "-e", "normal,build"]) else { return };
    assert!(module.iter().any(|l| l.starts_with("pyo3 ")), "the module's tree has no pyo3: {module:?}");
    let own =
        |l: &&String| l.starts_with("cpa-stream-python ") || l.starts_with("pyo3") || l.starts_with("target-lexicon ");
    let drifted: Vec<&String> = module.iter().filter(|l| !own(l) && !workspace.contains(*l)).collect();
    assert!(drifted.is_empty(), "crates with other features in the Python module's build: {drifted:?}");
}

/// scripts/build.sh builds the front alone first (`-p cpa-stream --bin cpa-stream
/// --no-default-features`), then everything: every crate of the first build has the features the
/// second gives it (else the second compiles Arrow, Parquet and the stages again; fixed by a
/// `unify-` line in the root Cargo.toml), and the first has no libtorch in it.
#[test]
fn the_fronts_early_build_compiles_no_crate_the_full_build_compiles_otherwise() {
    let Some(full) = cargo_tree(&["--workspace", "-e", "normal,build"]) else { return };
    let Some(front) = cargo_tree(&["-p", "cpa-stream", "--no-default-features", "-e", "normal,build"]) else {
        return;
    };
    assert!(front.iter().any(|l| l.starts_with("cpa-stream-stages ")), "the front's tree has no stages: {front:?}");
    let libtorch: Vec<&String> =
        front.iter().filter(|l| l.starts_with("tch ") || l.starts_with("torch-sys ")).collect();
    assert!(libtorch.is_empty(), "the front's early build compiles libtorch's binding: {libtorch:?}");
    let drifted: Vec<&String> = front.iter().filter(|l| !l.starts_with("cpa-stream ") && !full.contains(*l)).collect();
    assert!(drifted.is_empty(), "crates with other features in the front's early build: {drifted:?}");
}

/// `cargo tree` of this workspace, offline, one line per crate with its features (`{p} [{f}]`),
/// those compiled for the build machine (build scripts' dependencies, procedural macros and what
/// they use) marked `host `: cargo resolves their features apart from the others'. `None`, with
/// the reason printed, where it cannot run.
fn cargo_tree(args: &[&str]) -> Option<BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // With the target named, the build machine's crates are nodes of their own even where their
    // features equal the target's (without it, cargo tree shows such a crate once, under whichever
    // side it meets first).
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let out = match std::process::Command::new(&cargo)
        .args(["tree", "--offline", "--locked", "--prefix", "indent", "-f", "{p} [{f}]", "--target", &target])
        .args(args)
        .current_dir(repo_root())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: {cargo} could not be run: {e}");
            return None;
        }
    };
    if !out.status.success() {
        eprintln!("skipped: cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(tag_host_crates(&String::from_utf8_lossy(&out.stdout)))
}

/// The lines of an indented `cargo tree`, each crate once (a repeat is marked "(*)"), prefixed
/// `host ` under a `[build-dependencies]` heading or a procedural macro.
fn tag_host_crates(tree: &str) -> BTreeSet<String> {
    // Open scopes: (column from which they hold, whether what is in them is the host's).
    let mut scopes: Vec<(usize, bool)> = Vec::new();
    let mut lines = BTreeSet::new();
    for line in tree.lines() {
        let start = line.find(|c: char| !matches!(c, ' ' | '│' | '├' | '└' | '─')).unwrap_or(line.len());
        let column = line[..start].chars().count();
        let text = line[start..].trim_end_matches(" (*)");
        if text.is_empty() {
            continue;
        }
        if text.starts_with('[') {
            // A heading at this column covers the items that follow at this column and deeper.
            scopes.retain(|&(at, _)| at < column);
            scopes.push((column, text == "[build-dependencies]"));
            continue;
        }
        // An item's branch ("├── ") begins four columns before its name.
        let branch = column.saturating_sub(4);
        scopes.retain(|&(at, _)| at <= branch);
        let host = scopes.iter().any(|&(_, host)| host);
        lines.insert(if host { format!("host {text}") } else { text.to_owned() });
        if text.contains(" (proc-macro)") {
            scopes.push((column, true));
        }
    }
    lines
}

#[test]
fn the_tree_reader_marks_what_build_scripts_and_macros_use() {
    let tree = "a v1 [x]\n├── b v1 [y]\n│   [build-dependencies]\n│   └── c v1 [z]\n│       └── d v1 []\n\
                ├── m v1 (proc-macro) []\n│   └── e v1 [w]\n└── d v1 [q]\n[build-dependencies]\n└── f v1 []\n";
    let lines = tag_host_crates(tree);
    let expected = [
        "a v1 [x]",
        "b v1 [y]",
        "host c v1 [z]",
        "host d v1 []",
        "m v1 (proc-macro) []",
        "host e v1 [w]",
        "d v1 [q]",
        "host f v1 []",
    ];
    assert_eq!(lines, expected.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
}

#[test]
fn the_circle_check_finds_circles_and_reads_use_trees() {
    assert_eq!(
        expand("crate::{a::B, c::{D, e::F}}"),
        ["crate::a::B", "crate::c::D", "crate::c::e::F"].map(str::to_owned).to_vec()
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = dir.path();
    std::fs::create_dir_all(src.join("eval")).unwrap_or_else(|e| panic!("{e}"));
    let files = [
        ("lib.rs", "mod plots;\nmod eval;\nmod train;\n"),
        ("plots.rs", "use crate::{eval::Metrics, train::history::Epoch};\n"),
        ("train.rs", "// crate::eval is only mentioned here\npub fn run() { crate::plots::draw(); }\n"),
        ("eval/mod.rs", "mod a;\nmod b;\npub use a::X;\nfn f() { super::plots::draw(); }\n"),
        ("eval/a.rs", "use super::b::Y;\n"),
        ("eval/b.rs", "pub fn g() -> super::a::X { todo!() }\n#[cfg(test)]\nmod tests {\n    use crate::train;\n}\n"),
    ];
    for (name, text) in files {
        std::fs::write(src.join(name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    let edges = uses(src);
    let found = circles(&edges);
    let text = format!("{found:?}");
    assert_eq!(found.len(), 2, "{text}");
    assert!(text.contains("eval::a -> b") && text.contains("eval::b -> a"), "{text}");
    assert!(text.contains("plots -> eval") && text.contains("eval -> plots") && text.contains("train -> plots"));
    assert!(text.contains("plots -> train"), "{text}");
    assert!(!edges.contains_key(&(vec!["eval".to_owned(), "b".to_owned()], vec!["train".to_owned()])), "tests count");
    assert!(!edges.contains_key(&(vec!["train".to_owned()], vec!["eval".to_owned()])), "comments count");
}

/// The crates' source folders and the Python package, from the repository's root.
const SOURCES: [&str; 7] =
    ["schemas/src", "stages/src", "pipeline/src", "engine/src", "src", "python/src", "python/cpa_stream"];

/// The files of library code that start threads themselves, and why. Every other thread is
/// started by the crew (`stages/src/crew.rs`), which names it after its stage, stops and joins
/// it with the others, and turns its panic into an error naming the stage.
const THREAD_STARTERS: [(&str, &str); 2] = [
    ("stages/src/crew.rs", "the one owner of the threads"),
    ("stages/src/h5ad/watchdog.rs", "the process's HDF5 watchdog: it outlives every run and is never joined"),
];

/// What starting a thread looks like in Rust code.
const STARTS_A_THREAD: [&str; 4] = ["thread::spawn", "thread::Builder", ".spawn_scoped(", "scope.spawn("];

/// The most lines a file may hold: of a Rust file, its library code (its `#[cfg(test)]` module
/// and the files of tests, `tests.rs` and `*_tests.rs`, not counted); of a Python file, all.
const MAX_LINES: usize = 1000;

/// Every breach of the thread and size rules under `root` (files under [`SOURCES`]).
fn house_breaches(root: &Path, starters: &[(&str, &str)]) -> Vec<String> {
    let mut breaches = Vec::new();
    let sources: Vec<PathBuf> = SOURCES.iter().map(|s| root.join(s)).collect();
    for path in files_under(&sources, &["rs", "py"]) {
        let relative = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.extension().is_some_and(|e| e == "py") {
            let lines = text.lines().count();
            if lines > MAX_LINES {
                breaches.push(format!("{relative}: {lines} lines (at most {MAX_LINES})"));
            }
            continue;
        }
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let code = code_of(&text);
        if code.len() > MAX_LINES {
            breaches.push(format!("{relative}: {} lines of library code (at most {MAX_LINES})", code.len()));
        }
        if starters.iter().any(|(file, _)| *file == relative) {
            continue;
        }
        for (line, text) in &code {
            if STARTS_A_THREAD.iter().any(|p| text.contains(p)) {
                breaches.push(format!("{relative}:{line}: starts a thread itself (the crew starts every thread)"));
            }
        }
    }
    breaches
}

#[test]
fn threads_are_started_by_the_crew_and_no_file_grows_past_a_thousand_lines() {
    let breaches = house_breaches(&repo_root(), &THREAD_STARTERS);
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

#[test]
fn the_house_check_finds_a_planted_thread_and_a_long_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = dir.path();
    let src = root.join("stages/src");
    std::fs::create_dir_all(src.join("sink")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(root.join("python/cpa_stream")).unwrap_or_else(|e| panic!("{e}"));
    let long = "let x = 1;\n".repeat(MAX_LINES + 1);
    let tested = format!("{}#[cfg(test)]\nmod tests {{\n{}}}\n", "fn f() {}\n".repeat(10), "// t\n".repeat(MAX_LINES));
    let files = [
        ("stages/src/long.rs", long.as_str()),
        ("stages/src/tested.rs", tested.as_str()),
        (
            "stages/src/sink/pool.rs",
            "fn go() {\n    // thread::spawn in a comment\n    std::thread::spawn(|| ());\n}\n",
        ),
        ("stages/src/sink/tests.rs", "fn t() { std::thread::spawn(|| ()); }\n"),
        ("stages/src/quiet.rs", "fn f() {}\n#[cfg(test)]\nmod tests {\n    fn t() { std::thread::spawn(|| ()); }\n}\n"),
        ("stages/src/owner.rs", "fn own() { std::thread::Builder::new(); }\n"),
        ("python/cpa_stream/big.py", long.as_str()),
    ];
    for (name, text) in files {
        std::fs::write(root.join(name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    let breaches = house_breaches(root, &[("stages/src/owner.rs", "the owner")]);
    assert_eq!(
        breaches,
        [
            "python/cpa_stream/big.py: 1001 lines (at most 1000)",
            "stages/src/long.rs: 1001 lines of library code (at most 1000)",
            "stages/src/sink/pool.rs:3: starts a thread itself (the crew starts every thread)",
        ],
        "{breaches:#?}"
    );
}
