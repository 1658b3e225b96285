//! `infergate --check`: every shipped config is valid; errors name their YAML path.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::GATEWAY_BIN;
use std::process::Command;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(GATEWAY_BIN)
        .arg("--check")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_config_in_conf_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, stdout, stderr) = check(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains("OK"), "{stdout}");
            assert!(stdout.contains("filters: [request_id"), "{stdout}");
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn check_reports_every_error_with_its_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "server:\n  listen: \"127.0.0.1:0\"\n  colour: red\ntimeouts: { connect: soon }\npools:\n  - name: chat\n    models: [a]\n    aliases: { b: zz }\n    backends: []\n    balance: fastest\n  - name: other\n    models: [a]\n    backends: [\"127.0.0.1:1\"]\n    health_check: { path: health }\nrouting: { default_pool: nope }\nextra: 1\nfilters:\n  - request_id: { header: \"x request id\" }\n  - cors: { allow_origins: [\"localhost:5173\"] }\n  - limits: { per_key: { requests_per_second: 0 } }\naccess_log: { output: syslog, format: xml }\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 2);
    for expected in [
        "extra: unknown key",
        "server.colour: unknown field",
        "timeouts.connect: `soon` is not a duration",
        "pools[0].aliases.b: points to `zz`",
        "pools[0].backends: at least one backend",
        "pools[0].balance: `fastest`",
        "pools[1].health_check.path: must start with `/`",
        "pools[1].models: `a` is already served by pools[0]",
        "routing.default_pool: no pool is named `nope`",
        "filters[0].header: `x request id` is not a valid HTTP header name",
        "filters[1].allow_origins: `localhost:5173` is not an origin",
        "filters[2].per_key.requests_per_second",
        "access_log.format: `xml` is not a format",
        "access_log.output: `syslog` is not an output",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_and_invalid_yaml_fail_cleanly() {
    let (code, _, stderr) = check(std::path::Path::new("/nonexistent/infergate.yaml"));
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.yaml");
    std::fs::write(&path, "pools: [\n").unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 2);
    assert!(stderr.contains("not valid YAML"));
}

#[test]
fn runtime_breaking_values_are_caught_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "pools:\n  - name: chat\n    models: [a]\n    backends: [{ address: \"127.0.0.1:1\", weight: 4294967296 }]\n    health_check: { path: \"/he alth\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("pools[0].backends[0].weight: must be between 1 and 1000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pools[0].health_check.path: is not a valid URL path"),
        "{stderr}"
    );
}
