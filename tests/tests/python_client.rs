//! The Python client (clients/python) as a user gets it: `pip install ./clients/python` from
//! PyPI's packages into target/python-client, then its unittest modules under plain `python3`:
//! tensor decoding and options, retries against an in-process Python server built on the
//! generated stubs, the committed stubs against a fresh generation, and the client against real
//! `tome run` servers (plaintext with API keys serving MiniLM and a causal fixture, and mutual
//! TLS), its outputs checked against `tome process` and transformers' goldens. A skipped Python
//! test fails here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tome_e2e::*;

/// The grpcio-tools that scripts/gen_python_stubs.sh pins, for the stub check.
fn grpcio_tools_pin() -> String {
    let script = std::fs::read_to_string(repo().join("scripts/gen_python_stubs.sh")).unwrap();
    let line = script.lines().find_map(|l| l.strip_prefix("readonly GRPCIO_TOOLS_PIN=")).expect("GRPCIO_TOOLS_PIN in scripts/gen_python_stubs.sh");
    line.trim_matches('"').to_string()
}

/// Installs the client and its dependencies from PyPI (and the pinned grpcio-tools) into
/// target/python-client, once per run of this binary, so the package under test is the one in
/// the working tree; returns the directory to put on PYTHONPATH.
fn python_client() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = repo().join("target/python-client");
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&dir)
            .arg(repo().join("clients/python"))
            .arg(grpcio_tools_pin())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .expect("python3 (scripts/prereqs.sh python installs it)");
        assert!(out.status.success(), "pip install ./clients/python: {}", String::from_utf8_lossy(&out.stderr));
        assert!(dir.join("tome_client/py.typed").is_file(), "the installed package carries py.typed");
        dir
    })
}

/// Runs unittest `modules` of clients/python/tests with `env`; every test must run and pass.
/// Returns how many ran.
fn run_python_tests(modules: &[&str], env: &[(&str, String)]) -> usize {
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v"])
        .args(modules)
        .current_dir(repo().join("clients/python/tests"))
        .env("PYTHONPATH", python_client())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python3 -m unittest {modules:?}:\n{log}");
    // unittest's verdict is a line of its own; gRPC's own log lines may come around it.
    assert!(log.lines().any(|l| l == "OK") && !log.contains("skipped"), "every test runs, none skipped:\n{log}");
    log.lines().find_map(|l| l.strip_prefix("Ran ")?.split_whitespace().next()?.parse().ok()).unwrap_or_else(|| panic!("no test count in:\n{log}"))
}

#[test]
fn python_client_decodes_retries_uploads_and_ships_current_stubs() {
    let ran = run_python_tests(&["test_units", "test_retry", "test_stubs"], &[]);
    assert!(ran >= 20, "{ran} tests ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_against_real_servers_equals_the_cli_and_transformers() {
    let Some(model) = minilm() else { return };
    let causal = repo().join("crates/tome-model/tests/fixtures/gpt2-tiny");
    let dir = std::env::temp_dir().join(format!("tome-python-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = "python-0123456789abcdef";
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("python {key}\n")).unwrap();
    let server = start_server(&model, &["--model", causal.to_str().unwrap(), "--api-keys-file", keys.to_str().unwrap()]).await;

    // The reference: the CLI against the same server (~1,600 tokens, past MiniLM's positions).
    let text = dir.join("doc.txt");
    std::fs::write(&text, TEXT.repeat(30)).unwrap();
    let reference = dir.join("reference");
    let cli = Command::new(tome_bin())
        .args(["process", "--coordinator", &server.addr, "--api-key", key, "--emit", "document,chunks,hidden-states"])
        .args(["--attention", "window:128", "--positions", "tile", "--chunk-tokens", "300", "--normalize", "--ranks", "2", "--quiet", "--out"])
        .arg(&reference)
        .arg(&text)
        .output()
        .unwrap();
    assert!(cli.status.success(), "tome process: {}", String::from_utf8_lossy(&cli.stderr));

    // The same model over mutual TLS, with the TLS tests' throwaway CA.
    let pki = Pki::new("python-client");
    let model_arg = model.to_string_lossy();
    let mut args = vec!["run", "--model", &model_arg];
    let tls_flags = pki.server_flags("coordinator");
    args.extend(tls_flags.iter().map(String::as_str));
    let tls = spawn_serving_tls(&args, "tome.v1.Tome", None, "127.0.0.1:0".into(), Some(pki.client("ca", Some("client")))).await;

    let path = |p: &Path| p.to_string_lossy().into_owned();
    let env = [
        ("TOME_TEST_URL", server.addr.clone()),
        ("TOME_TEST_API_KEY", key.to_string()),
        ("TOME_TEST_TEXT", path(&text)),
        ("TOME_TEST_REFERENCE", path(&reference)),
        ("TOME_TEST_CAUSAL_MODEL", "gpt2-tiny".to_string()),
        ("TOME_TEST_CAUSAL_FIXTURE", path(&causal)),
        ("TOME_TEST_TLS_URL", tls.addr.clone()),
        ("TOME_TEST_TLS_DIR", path(&pki.dir)),
    ];
    let ran = tokio::task::spawn_blocking(move || run_python_tests(&["test_live"], &env)).await.unwrap();
    assert!(ran >= 8, "{ran} tests ran");
    std::fs::remove_dir_all(&dir).ok();
}
