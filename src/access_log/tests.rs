use super::file::RotatingFile;
use super::record::{notice, render, Loss};
use super::*;
use crate::batch_writer::Sink;
use std::path::Path;

fn record() -> Record<'static> {
    Record {
        request_id: "req-1",
        client: Some("10.0.0.7:51234".into()),
        user: Some("alice"),
        method: "POST",
        path: "/v1/chat/completions",
        status: 200,
        duration_ms: 1.208_333_3,
        endpoint: "chat_completions",
        model: Some("tiny-chat"),
        pool: Some("chat"),
        backend: Some("127.0.0.1:18001".into()),
        prompt_tokens: Some(12),
        completion_tokens: Some(34),
        usage: Some("reported"),
        ttft_ms: Some(1.198),
        request_bytes: 81,
        response_bytes: 334,
        stream: true,
        error: None,
        client_gone: false,
        ..Record::default()
    }
}

const KEYS: [&str; 24] = [
    "time",
    "request_id",
    "client",
    "user",
    "method",
    "path",
    "status",
    "duration_ms",
    "endpoint",
    "model",
    "pool",
    "backend",
    "prompt_tokens",
    "completion_tokens",
    "usage",
    "ttft_ms",
    "request_bytes",
    "response_bytes",
    "stream",
    "error",
    "client_gone",
    "queue_ms",
    "retries",
    "fallback",
];

fn file_config(dir: &Path, max_size_bytes: u64, max_files: usize) -> AccessLogConfig {
    AccessLogConfig {
        enabled: true,
        format: Format::Json,
        output: Output::File(FileOutput {
            path: dir.join("logs").join("access.log"),
            max_size_bytes,
            max_age: None,
            max_files,
        }),
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn json_line_has_every_key() {
    let line = render(Format::Json, &record()).unwrap();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(line.len(), line.capacity(), "right-sized buffer");
    let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
    let object = value.as_object().unwrap();
    for key in KEYS {
        assert!(object.contains_key(key), "missing {key}: {value}");
    }
    assert_eq!(object.len(), KEYS.len());
    let time = value["time"].as_str().unwrap();
    assert_eq!(time.len(), "2026-11-21T22:31:00.123Z".len(), "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    assert_eq!(value["duration_ms"], 1.208);
    assert_eq!(value["error"], serde_json::Value::Null);
    assert_eq!(value["status"], 200);
    assert_eq!(value["stream"], true);
    assert_eq!(value["client"], "10.0.0.7:51234");

    // a given time is kept; None fields are null
    let given = Record {
        time: "2026-01-02T03:04:05.006Z".into(),
        ..Record::default()
    };
    let value: serde_json::Value =
        serde_json::from_slice(&render(Format::Json, &given).unwrap()).unwrap();
    assert_eq!(value["time"], "2026-01-02T03:04:05.006Z");
    assert_eq!(value["model"], serde_json::Value::Null);
    assert_eq!(value["ttft_ms"], serde_json::Value::Null);
    assert_eq!(value.as_object().unwrap().len(), KEYS.len());
}

#[test]
fn text_line() {
    let mut r = record();
    r.time = "2026-11-21T22:31:00.123Z".into();
    let line = String::from_utf8(render(Format::Text, &r).unwrap()).unwrap();
    assert_eq!(
        line,
        "2026-11-21T22:31:00.123Z req-1 POST /v1/chat/completions status=200 dur_ms=1.208 \
         ttfb_ms=1.198 endpoint=chat_completions user=alice model=tiny-chat pool=chat \
         backend=127.0.0.1:18001 client=10.0.0.7:51234 stream=true req_bytes=81 resp_bytes=334 \
         prompt_tokens=12 completion_tokens=34 usage=reported error=- client_gone=false \
         queue_ms=- retries=0 fallback=-\n"
    );

    // nothing in a value can split the line or forge a key
    let odd = Record {
        request_id: "a b",
        model: Some("x\ny error=forged"),
        user: Some(""),
        ..Record::default()
    };
    let line = String::from_utf8(render(Format::Text, &odd).unwrap()).unwrap();
    assert_eq!(line.matches('\n').count(), 1);
    assert!(line.contains(" \"a b\" "), "{line}");
    assert!(line.contains(r#"model="x\ny error=forged""#), "{line}");
    assert!(line.contains(r#"user="""#), "{line}");
    assert!(line.contains(" ttfb_ms=- "), "{line}");
}

#[test]
fn rotates_at_the_size_limit_and_keeps_max_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_config(dir.path(), 1024, 2);
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // left over from a run with more files: deleted at start
    std::fs::write(logs.join("access.log.5"), "old\n").unwrap();
    std::fs::write(logs.join("access.log.other"), "not ours\n").unwrap();

    let log = AccessLog::start(config).unwrap();
    assert!(!logs.join("access.log.5").exists());
    assert!(logs.join("access.log.other").exists());
    for i in 0..40 {
        let id = format!("req-{i}");
        log.write(&Record {
            request_id: &id,
            ..record()
        });
    }
    drop(log); // writes the queue, stops the writer

    let current = logs.join("access.log");
    for path in [
        &current,
        &logs.join("access.log.1"),
        &logs.join("access.log.2"),
    ] {
        let len = std::fs::metadata(path).unwrap().len();
        assert!(len > 0 && len <= 1024, "{} is {len} bytes", path.display());
        for line in read_lines(path) {
            serde_json::from_str::<serde_json::Value>(&line).unwrap();
        }
    }
    assert!(!logs.join("access.log.3").exists());
    let last = read_lines(&current).pop().unwrap();
    assert!(last.contains("\"req-39\""), "{last}");
}

#[test]
fn rotates_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let t0 = Instant::now();
    let mut file = RotatingFile::open(
        FileOutput {
            path: path.clone(),
            max_size_bytes: 0,
            max_age: Some(Duration::from_secs(3600)),
            max_files: 3,
        },
        t0,
    )
    .unwrap();
    file.begin_batch(t0);
    file.write_line(b"one\n");
    file.flush();
    file.begin_batch(t0 + Duration::from_secs(1800));
    file.write_line(b"two\n");
    file.flush();
    assert!(!dir.path().join("access.log.1").exists());

    file.begin_batch(t0 + Duration::from_secs(3601));
    file.write_line(b"three\n");
    file.flush();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");

    // the new file's age counts from its rotation
    file.begin_batch(t0 + Duration::from_secs(3601 + 1800));
    file.write_line(b"four\n");
    file.flush();
    assert!(!dir.path().join("access.log.2").exists());
    file.begin_batch(t0 + Duration::from_secs(3601 + 3601));
    file.write_line(b"five\n");
    file.flush();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("access.log.2")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
        "three\nfour\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "five\n");
}

#[test]
fn counts_and_reports_drops_when_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, rx) = BatchWriter::unstarted(2);
    let config = file_config(dir.path(), 0, 1);
    let mut log = AccessLog {
        format: config.format,
        writer: Some(writer),
    };
    for _ in 0..5 {
        log.write(&record()); // the writer is not running: 2 fit, 3 dropped
    }
    let writer = log.writer.as_mut().unwrap();
    assert_eq!(writer.dropped(), 3);
    let sink = AccessSink::open(config).unwrap().unwrap();
    writer.run("access-log", rx, sink).unwrap();
    drop(log);

    let lines = read_lines(&dir.path().join("logs").join("access.log"));
    assert_eq!(lines.len(), 3, "{lines:?}");
    let notice: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(notice["event"], "access_log_dropped");
    assert_eq!(notice["dropped"], 3);
    assert_eq!(notice["reason"], "queue_full");

    let text = String::from_utf8(notice_line(Format::Text, 4)).unwrap();
    assert!(
        text.ends_with(" [infergate] 4 access lines dropped: the access log writer fell behind\n"),
        "{text}"
    );
}

fn notice_line(format: Format, n: u64) -> Vec<u8> {
    notice(format, n, Loss::QueueFull)
}

#[test]
fn reopens_after_an_external_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let moved = dir.path().join("access.log-20261121");
    let t0 = Instant::now();
    let mut file = RotatingFile::open(FileOutput::new(&path), t0).unwrap();
    file.begin_batch(t0);
    file.write_line(b"a\n");
    file.flush();
    std::fs::rename(&path, &moved).unwrap(); // logrotate

    // within the check interval: still the old file
    file.begin_batch(t0 + Duration::from_millis(500));
    file.write_line(b"b\n");
    file.flush();
    assert!(!path.exists());

    file.begin_batch(t0 + Duration::from_millis(1600));
    file.write_line(b"c\n");
    file.flush();
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), "a\nb\n");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "c\n");

    // deleted outright: same
    std::fs::remove_file(&path).unwrap();
    file.begin_batch(t0 + Duration::from_millis(3000));
    file.write_line(b"d\n");
    file.flush();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "d\n");
}

#[test]
fn lines_lost_while_the_path_is_unusable_are_reported_after() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let path = logs.join("access.log");
    let t0 = Instant::now();
    let mut sink = AccessSink {
        out: Out::File(RotatingFile::open(FileOutput::new(&path), t0).unwrap()),
        format: Format::Json,
    };
    sink.begin_batch(t0);
    sink.write_line(b"a\n");
    sink.flush();
    // the directory is moved away and a file takes its name
    std::fs::rename(&logs, dir.path().join("logs.old")).unwrap();
    std::fs::write(&logs, "").unwrap();

    sink.begin_batch(t0 + Duration::from_secs(2)); // reopen fails
    sink.write_line(b"b\n");
    sink.write_line(b"c\n");
    sink.flush();
    assert_eq!(sink.take_lost(), 2);
    sink.begin_batch(t0 + Duration::from_secs(2) + Duration::from_millis(5));
    sink.write_line(b"d\n");
    sink.write_notice(&notice(Format::Json, 2, Loss::WriteError));
    sink.flush();
    assert_eq!(sink.take_lost(), 1, "the notice does not count itself");

    std::fs::remove_file(&logs).unwrap();
    sink.begin_batch(t0 + Duration::from_secs(4)); // reopen works
    sink.write_line(b"e\n");
    sink.write_notice(&notice(Format::Json, 1, Loss::WriteError));
    sink.flush();
    let lines = read_lines(&path);
    assert_eq!(lines[0], "e");
    let notice: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(notice["reason"], "write_error");
    assert_eq!(notice["dropped"], 1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("logs.old").join("access.log")).unwrap(),
        "a\n"
    );
}

#[test]
fn unwritable_path_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let path = blocker.join("access.log");
    let err = AccessLog::start(AccessLogConfig {
        output: Output::File(FileOutput::new(&path)),
        ..AccessLogConfig::default()
    })
    .unwrap_err();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn disabled_writes_nothing() {
    let log = AccessLog::start(AccessLogConfig {
        enabled: false,
        ..AccessLogConfig::default()
    })
    .unwrap();
    assert!(!log.is_enabled());
    log.write(&record());
    assert!(log.writer.is_none());
}

#[test]
fn shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<AccessLog>();
}
