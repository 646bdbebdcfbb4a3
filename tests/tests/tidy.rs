//! Checks that keep the documents and the manifests true to the code: the crate layering that
//! ARCHITECTURE.md's code map states is the one the manifests declare, and every dependency a
//! crate declares is used by its code.

use std::path::Path;

use tome_e2e::repo;

/// The `[dependencies]` of a crate's Cargo.toml, by package name.
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut in_deps = false;
    let mut deps = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && !line.is_empty() && !line.starts_with('#') {
            let name = line.split(|c: char| c == '.' || c == '=' || c.is_whitespace()).next().unwrap();
            deps.push(name.to_string());
        }
    }
    deps
}

/// The crates of the code map, top of the table first.
fn code_map() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    text.lines().filter_map(|l| l.strip_prefix("| `tome-")).map(|l| format!("tome-{}", l.split('`').next().unwrap())).collect()
}

fn crates() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("crates")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn crate_dependencies_point_down_the_code_map_of_architecture_md() {
    let order = code_map();
    for name in crates() {
        let at = order.iter().position(|c| *c == name).unwrap_or_else(|| panic!("ARCHITECTURE.md's code map has no row for {name}"));
        for dep in dependencies(&repo().join("crates").join(&name).join("Cargo.toml")).into_iter().filter(|d| d.starts_with("tome-")) {
            let dep_at = order.iter().position(|c| *c == dep).unwrap_or_else(|| panic!("{name} depends on {dep}, which the code map does not list"));
            assert!(dep_at < at, "{name} depends on {dep}, which ARCHITECTURE.md's code map puts below it");
        }
    }
}

/// Every `[dependencies]` entry is named by the crate's own code (`name::`, `use name`, or a
/// macro of it), so none is carried unused. Generated code is the one place a dependency is
/// used unnamed: tome-proto's generated modules call tonic-prost.
#[test]
fn every_declared_dependency_is_used() {
    fn sources(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let used_by_generated_code = [("tome-proto", "tonic-prost")];
    for name in crates() {
        let dir = repo().join("crates").join(&name);
        let mut code = String::new();
        sources(&dir.join("src"), &mut code);
        if dir.join("build.rs").is_file() {
            code.push_str(&std::fs::read_to_string(dir.join("build.rs")).unwrap());
        }
        for dep in dependencies(&dir.join("Cargo.toml")) {
            if used_by_generated_code.contains(&(name.as_str(), dep.as_str())) {
                continue;
            }
            let ident = dep.replace('-', "_");
            let named = [format!("{ident}::"), format!("use {ident}"), format!("{ident}!")].iter().any(|p| code.contains(p.as_str()));
            assert!(named, "{name} declares {dep} but its code never names it");
        }
    }
}

/// What every server process shares — the heap policy, the deadline header, the retry-after
/// marker, etcd's connection options — is defined once, in tome-server: no other crate defines
/// it again or spells its header names, so neither server reaches into the other for plumbing.
#[test]
fn process_plumbing_lives_in_tome_server() {
    let owned_by_tome_server =
        ["fn grpc_timeout", "fn etcd_options", "RETRY_AFTER: &str", "fn retain_freed_memory", "fn release_freed_memory", "\"retry-after\"", "\"grpc-timeout\""];
    fn check(dir: &Path, crate_name: &str, owned: &[&str]) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                check(&path, crate_name, owned);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let code = std::fs::read_to_string(&path).unwrap();
                for item in owned {
                    assert!(!code.contains(item), "{} ({crate_name}) has `{item}`, which belongs to tome-server", path.display());
                }
            }
        }
    }
    for name in crates().into_iter().filter(|n| n != "tome-server") {
        check(&repo().join("crates").join(&name).join("src"), &name, &owned_by_tome_server);
    }
    let coordinator = std::fs::read_to_string(repo().join("crates/tome-coordinator/Cargo.toml")).unwrap();
    assert!(coordinator.contains("tome-server.workspace"), "the coordinator takes its plumbing from tome-server");
}
