//! Config hot reload: `POST /admin/reload`, SIGHUP and the file watch apply a
//! new YAML live; a bad file changes nothing; and 50 reloads of every kind
//! under continuous streaming and non-streaming load fail no request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `infergate_config_reloads_total{kind="config",result}` from /metrics.
fn reloads(gw: &Proc, result: &str) -> u64 {
    let text = metrics_text(gw);
    let key = format!("infergate_config_reloads_total{{kind=\"config\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_in_place(path: &Path, text: &str) {
    use std::io::Write;
    // truncate + write in two steps, like an editor without atomic saves
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let (a, b) = text.as_bytes().split_at(text.len() / 2);
    f.write_all(a).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    f.write_all(b).unwrap();
}

/// A Kubernetes ConfigMap update: `infergate.yaml -> ..data/infergate.yaml`,
/// `..data -> ..<version>`, and the `..data` link swapped by a rename.
fn write_configmap(dir: &Path, version: usize, text: &str) {
    let versioned = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    std::fs::write(versioned.join("infergate.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("infergate.yaml");
    if !std::fs::symlink_metadata(&link)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        let tmp = dir.join("infergate.yaml.link");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink("..data/infergate.yaml", &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    }
}

fn config(backends: &[SocketAddr], alias: &str, top: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"server:
  listen: "127.0.0.1:0"
  admin_listen: "127.0.0.1:0"
  threads: 2
  watch_config: true
{top}
pools:
  - name: chat
    models: ["tiny-chat"]
    aliases: {{ "{alias}": tiny-chat }}
    backends: [{}]
    health_check: {{ path: /health, interval: 200ms }}
"#,
        list.join(", ")
    )
}

fn chat(gw: &Proc, model: &str) -> (u16, String) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(model, false))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

/// A gateway whose admin endpoints are on their own loopback listener.
struct Gw {
    proc: Proc,
    admin: SocketAddr,
}

impl std::ops::Deref for Gw {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

fn start(path: &Path) -> Gw {
    let proc = gateway_file(path, &[]);
    let admin = proc.next_addr("infergate admin listening on http://");
    Gw { proc, admin }
}

fn admin_reload(gw: &Gw) -> (u16, serde_json::Value) {
    let r = client()
        .post(format!("http://{}/admin/reload", gw.admin))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}

fn sighup(gw: &Proc) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
}

fn temp_config_dir() -> PathBuf {
    tempfile::tempdir().unwrap().keep()
}

#[test]
fn reload_applies_a_new_file_and_a_bad_file_changes_nothing() {
    let engine = mock(&["--model", "tiny-chat"]);
    let dir = temp_config_dir();
    let path = dir.join("infergate.yaml");
    std::fs::write(&path, config(&[engine.addr], "first", "")).unwrap();
    let gw = start(&path);
    wait_healthy(&gw, 1);
    assert_eq!(chat(&gw, "first").0, 200);

    // the same file: success, nothing changed
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 2);
    assert_eq!(body["changes"], serde_json::json!([]));

    // a new alias, through the admin endpoint
    write_atomic(&path, &config(&[engine.addr], "second", ""));
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"], serde_json::json!(["pool `chat` changed"]));
    assert_eq!(chat(&gw, "second").0, 200);
    assert_eq!(chat(&gw, "first").0, 404);

    // a YAML syntax error: 422, nothing changes, counted
    let failures = reloads(&gw, "failure");
    write_atomic(&path, "pools: [ {name: chat\n");
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "reload_failed");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("infergate.yaml"), "{message}");
    assert_eq!(chat(&gw, "second").0, 200);
    assert!(reloads(&gw, "failure") > failures);

    // a wrong value: the message names its YAML path
    write_atomic(
        &path,
        &config(&[engine.addr], "third", "").replace("models:", "balance: sideways\n    models:"),
    );
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("pools[0].balance"), "{message}");
    assert_eq!(chat(&gw, "second").0, 200);
    assert_eq!(chat(&gw, "third").0, 404);

    // a listener or scheduler change is reported, not applied; the rest is applied
    write_atomic(
        &path,
        &config(&[engine.addr], "fourth", "").replace(
            "\n  listen: \"127.0.0.1:0\"",
            "\n  listen: \"127.0.0.1:1\"\n  work_stealing: false",
        ),
    );
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["server.listen", "server.work_stealing"])
    );
    assert_eq!(chat(&gw, "fourth").0, 200);

    // SIGHUP (systemd's ExecReload): a limits filter appears
    let limited = config(
        &[engine.addr],
        "fifth",
        "filters:\n  - limits: { global: { requests_per_second: 1, burst: 1 } }",
    );
    // the watch would pick this up too; SIGHUP must work on its own
    let before = reloads(&gw, "success");
    write_in_place(&path, &limited);
    sighup(&gw);
    wait_until(Duration::from_secs(10), "the SIGHUP reload", || {
        reloads(&gw, "success") > before
    });
    wait_until(Duration::from_secs(10), "a 429 from the new limit", || {
        chat(&gw, "fifth").0 == 429
    });

    // the file watch, through a ConfigMap-style ..data swap: the limit goes
    std::fs::remove_file(&path).unwrap();
    write_configmap(&dir, 1, &config(&[engine.addr], "sixth", ""));
    wait_until(Duration::from_secs(10), "the watched ..data swap", || {
        chat(&gw, "sixth").0 == 200
    });
    for _ in 0..5 {
        assert_eq!(chat(&gw, "sixth").0, 200, "the limit is gone");
    }
    let log = gw.stderr();
    assert!(log.contains("config reloaded (SIGHUP)"), "{log}");
    assert!(
        log.contains("config reloaded (config file changed)"),
        "{log}"
    );
    assert!(
        log.contains("config reload (POST /admin/reload) failed"),
        "{log}"
    );
}

/// What the load threads saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    streams: AtomicU64,
    failed: Mutex<Vec<String>>,
}

#[test]
fn fifty_reloads_under_load_fail_no_request() {
    // two engines; streams take ~100 ms so reloads land while they run
    let a = mock(&["--model", "tiny-chat", "--token-interval-ms", "10"]);
    let b = mock(&["--model", "tiny-chat", "--token-interval-ms", "10"]);
    let dir = temp_config_dir();
    let path = dir.join("infergate.yaml");
    let limits = "filters:\n  - request_id: {}\n  - limits: { global: { requests_per_second: 100000, concurrent: 1000 } }";
    let variants = |i: usize| -> String {
        let backends: Vec<SocketAddr> = match i % 4 {
            0 => vec![a.addr],
            1 => vec![a.addr, b.addr],
            2 => vec![b.addr],
            _ => vec![b.addr, a.addr],
        };
        let top = if i.is_multiple_of(2) { limits } else { "" };
        config(&backends, &format!("alias-{i}"), top)
    };
    std::fs::write(&path, variants(0)).unwrap();
    let gw = start(&path);
    wait_healthy(&gw, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, tally, url) = (stop.clone(), tally.clone(), gw.url("/v1/chat/completions"));
        let stream = worker >= 2;
        load.push(std::thread::spawn(move || {
            // keep-alive connections, reused across reloads
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let sent = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(chat_body("tiny-chat", stream))
                    .send();
                let outcome = match sent {
                    Err(e) => Err(format!("send: {e}")),
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match r.text() {
                            Err(e) => Err(format!("{status} body: {e}")),
                            Ok(_) if status != 200 => Err(format!("status {status}")),
                            Ok(body) if stream && !body.contains("data: [DONE]") => {
                                Err(format!("stream without [DONE]: {body}"))
                            }
                            Ok(_) => Ok(()),
                        }
                    }
                };
                match outcome {
                    Ok(()) if stream => {
                        tally.streams.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.failed.lock().unwrap().push(e),
                }
            }
        }));
    }

    let mut kinds = std::collections::BTreeMap::<&str, u32>::new();
    let mut configmap_version = 0;
    for i in 1..=50 {
        let text = variants(i);
        let before = reloads(&gw, "success");
        let kind = match i % 6 {
            0 => {
                write_atomic(&path, &text);
                let (status, body) = admin_reload(&gw);
                assert_eq!(status, 200, "{body}");
                "admin, atomic rename"
            }
            1 => {
                write_in_place(&path, &text);
                sighup(&gw);
                "SIGHUP, in-place write"
            }
            2 => {
                if path.is_file() && !path.is_symlink() {
                    std::fs::remove_file(&path).unwrap();
                }
                configmap_version += 1;
                write_configmap(&dir, configmap_version, &text);
                "watch, ..data symlink swap"
            }
            3 => {
                write_atomic(&path, &text);
                "watch, atomic rename"
            }
            4 => {
                // a bad file first: refused, nothing changes, load unaffected
                write_atomic(
                    &path,
                    "pools:\n  - name: chat\n    backends: [not-an-address]\n",
                );
                let (status, body) = admin_reload(&gw);
                assert_eq!(status, 422, "{body}");
                write_atomic(&path, &text);
                sighup(&gw);
                "bad file refused, then SIGHUP"
            }
            _ => {
                write_in_place(&path, &text);
                "watch, in-place write"
            }
        };
        *kinds.entry(kind).or_default() += 1;
        wait_until(Duration::from_secs(15), "the reload to apply", || {
            reloads(&gw, "success") > before
        });
        // the new alias routes: the new generation is live
        wait_until(Duration::from_secs(5), "the new alias", || {
            chat(&gw, &format!("alias-{i}")).0 == 200
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    let ok = tally.ok.load(Ordering::Relaxed);
    let streams = tally.streams.load(Ordering::Relaxed);
    println!(
        "50 reloads ({kinds:?}) under load: {ok} non-streaming + {streams} streaming requests succeeded, {} failed; {} successful reloads, {} refused",
        failed.len(),
        reloads(&gw, "success"),
        reloads(&gw, "failure"),
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        ok > 100 && streams > 20,
        "too little load: {ok} / {streams}"
    );
    // both engines took traffic over the run
    for engine in [&a, &b] {
        let stats = get_json(&format!("http://{}/mock/stats", engine.addr));
        assert!(stats["requests"].as_u64().unwrap_or(0) > 0, "{stats}");
    }
}

/// A reload that removes a backend and an alias also removes their series
/// from /metrics; what stays keeps being reported.
#[test]
fn a_reload_drops_the_metrics_of_what_it_removed() {
    let a = mock(&["--model", "tiny-chat"]);
    let b = mock(&["--model", "tiny-chat"]);
    let dir = temp_config_dir();
    let path = dir.join("infergate.yaml");
    std::fs::write(&path, config(&[a.addr, b.addr], "old-alias", "")).unwrap();
    let gw = start(&path);
    wait_healthy(&gw, 2);
    let healthy = |addr: SocketAddr| {
        format!("infergate_backend_healthy{{backend=\"{addr}\",pool=\"chat\"}} 1")
    };
    let before = metrics_text(&gw);
    assert!(before.contains(&healthy(a.addr)), "{before}");
    assert!(before.contains(&healthy(b.addr)), "{before}");
    assert!(
        before.contains("vllm_model_loaded{model_id=\"old-alias\"} 1"),
        "{before}"
    );

    write_atomic(&path, &config(&[a.addr], "new-alias", ""));
    let (status, body) = admin_reload(&gw);
    assert_eq!(status, 200, "{body}");
    let after = metrics_text(&gw);
    assert!(after.contains(&healthy(a.addr)), "{after}");
    assert!(
        !after.contains(&format!("backend=\"{}\"", b.addr)),
        "a removed backend is still exported:\n{after}"
    );
    assert!(
        !after.contains("model_id=\"old-alias\""),
        "a removed alias is still exported:\n{after}"
    );
    assert!(
        after.contains("vllm_model_loaded{model_id=\"new-alias\"} 1"),
        "{after}"
    );
}

/// A reload that fails leaves the running keys alone even though it re-read
/// the key file: the new file is only put in use with the rest of the
/// config.
#[test]
fn a_failed_reload_does_not_apply_the_key_file_it_read() {
    let engine = mock(&["--model", "tiny-chat"]);
    let dir = temp_config_dir();
    let keys = dir.join("keys.json");
    let admin = "sk-admin-000000000000000000000000";
    let old_key = "sk-old-0000000000000000000000000000";
    let new_key = "sk-new-0000000000000000000000000000";
    let write_keys = |user_key: &str, quota: &str| {
        write_atomic(
            &keys,
            &format!(
                r#"{{"keys": [{{"key": "{admin}", "user": "ops", "role": "admin"}},
                 {{"key": "{user_key}", "user": "app"{quota}}}]}}"#
            ),
        );
    };
    write_keys(old_key, "");
    let filters = |data_dir: &str| {
        format!(
            "filters:\n  - auth: {{ api_keys_file: \"{}\" }}\n  - limits: {{ global: {{ requests_per_second: 1000 }}{data_dir} }}",
            keys.display()
        )
    };
    let path = dir.join("infergate.yaml");
    std::fs::write(&path, config(&[engine.addr], "chat", &filters(""))).unwrap();
    let gw = start(&path);
    wait_healthy(&gw, 1);
    let status_with = |key: &str| {
        client()
            .post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(chat_body("tiny-chat", false))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let reload = || {
        let r = client()
            .post(format!("http://{}/admin/reload", gw.admin))
            .header("authorization", format!("Bearer {admin}"))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().unwrap_or_default())
    };
    assert_eq!(status_with(old_key), 200);

    // the new key file gives its key a quota, which needs limits.data_dir:
    // the reload fails after the file was read
    write_keys(new_key, r#", "quota": 1000"#);
    let (status, body) = reload();
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("data_dir"), "{message}");
    assert_eq!(status_with(old_key), 200, "the running keys changed");
    assert_eq!(
        status_with(new_key),
        401,
        "the refused key file was applied"
    );

    // with data_dir the same files load, and the new key replaces the old
    let data = dir.join("data");
    write_atomic(
        &path,
        &config(
            &[engine.addr],
            "chat",
            &filters(&format!(", data_dir: \"{}\"", data.display())),
        ),
    );
    let (status, body) = reload();
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(10), "the new key", || {
        status_with(new_key) == 200
    });
    assert_eq!(status_with(old_key), 401);
}
