//! `sdbooth ui`: the real binary serving on loopback, driven over HTTP like the page does.
//! The access token and Host check, the dry run of examples/toy, starting, listing, stopping,
//! queueing and resuming runs of builtin:tiny-sd1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy").canonicalize().expect("examples/toy")
}

/// A running `sdbooth ui`, stopped (SIGINT, as Ctrl-C) when dropped.
struct Ui {
    child: Child,
    port: u16,
    token: String,
    url_line: String,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn start_ui(cwd: &Path, port: u16, workdir: &Path) -> Ui {
    let child = Command::new(env!("CARGO_BIN_EXE_sdbooth"))
        .current_dir(cwd)
        .args(["ui", "--no-browser", "--port", &port.to_string(), "--workdir"])
        .arg(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sdbooth ui starts");
    // From here on, a panic drops `ui`, which stops and reaps the child.
    let mut ui = Ui { child, port: 0, token: String::new(), url_line: String::new() };
    let mut out = BufReader::new(ui.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).expect("reads stdout") == 0 {
            panic!("sdbooth ui exited before printing its URL");
        }
        if let Some(at) = line.find("http://127.0.0.1:") {
            let url = line[at..].trim().to_string();
            let rest = &url["http://127.0.0.1:".len()..];
            ui.port = rest[..rest.find('/').expect("path")].parse().expect("port");
            ui.token = url.split("?token=").nth(1).expect("token").to_string();
            ui.url_line = line.trim().to_string();
            // Keep reading stdout so the UI never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return ui;
        }
    }
    panic!("no URL printed");
}

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`; `host` is the Host header.
fn request(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).expect("sends");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reads");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.into()
    };
    Resp { status, headers: head.to_string(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Ui {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> Resp {
        request(self.port, "GET", path, &self.host(), &[("X-Sdbooth-Token", &self.token)], None)
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        request(self.port, "POST", path, &self.host(), &[("X-Sdbooth-Token", &self.token)], Some(body))
    }

    /// Polls a run until `pred` holds on its detail (or panics after `secs`).
    fn wait_run(&self, id: &str, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.get(&format!("/api/runs/{id}")).json();
            if pred(&d) {
                return d;
            }
            if Instant::now() > deadline {
                panic!("run {id}: {what} did not happen: {d:#}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A tiny-sd1 run of the toy dataset.
fn toy_setup(steps: u64, extra: Value) -> Value {
    let mut flags = json!({
        "pretrained_model_name_or_path": "builtin:tiny-sd1",
        "dataset_config": toy().join("dataset.toml").display().to_string(),
        "output_name": "m",
        "max_train_steps": steps.to_string(),
        "learning_rate": "1e-4",
        "optimizer_type": "AdamW",
        "seed": "3",
        "cache_latents": true,
        "save_model_as": "safetensors",
        "max_data_loader_n_workers": "1",
    });
    if let (Some(f), Value::Object(e)) = (flags.as_object_mut(), extra) {
        f.extend(e);
    }
    json!({ "flags": flags })
}

#[test]
fn the_documented_command_prints_a_token_url_and_refuses_requests_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let ui = start_ui(dir.path(), 7861, Path::new("ui-runs"));
    assert!(ui.url_line.contains("http://127.0.0.1:7861/?token="), "{}", ui.url_line);
    assert!(dir.path().join("ui-runs").is_dir(), "the workdir is created, relative to the working directory");
    let curl = |url: &str| {
        let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]).output();
        String::from_utf8_lossy(&out.expect("curl runs").stdout).into_owned()
    };
    assert_eq!(curl("http://127.0.0.1:7861/"), "401");
    let url = format!("http://127.0.0.1:7861/?token={}", ui.token);
    assert_eq!(curl(&url), "200");
    let page = Command::new("curl").args(["-s", &url]).output().expect("curl runs");
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.starts_with("<!doctype html>") && page.contains("<title>sdbooth</title>"), "{page}");
}

#[test]
fn token_host_and_post_rules() {
    let dir = tempfile::tempdir().unwrap();
    let ui = start_ui(dir.path(), 0, &dir.path().join("runs"));
    let host = ui.host();
    let get = |path: &str, headers: &[(&str, &str)]| request(ui.port, "GET", path, &host, headers, None);
    for path in ["/", "/app.js", "/api/runs", "/api/schema", "/runs/x/files/report.html", "/nothing"] {
        assert_eq!(get(path, &[]).status, 401, "{path}");
        assert_eq!(get(&format!("{path}?token=wrong"), &[]).status, 401, "{path}");
    }
    assert_eq!(get("/", &[("X-Sdbooth-Token", "0123")]).status, 401);
    // The printed URL: 200, and a cookie for the next requests.
    let first = get(&format!("/?token={}", ui.token), &[]);
    assert_eq!(first.status, 200);
    assert!(first.body.contains("<html") && first.body.contains(&ui.token));
    let cookie_line = first
        .headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie")
        .to_string();
    assert!(cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"), "{cookie_line}");
    let cookie = cookie_line.split_once(':').unwrap().1.split(';').next().unwrap().trim().to_string();
    assert_eq!(get("/api/runs", &[("Cookie", &cookie)]).status, 200);
    let bearer = format!("Bearer {}", ui.token);
    assert_eq!(get("/api/runs", &[("Authorization", &bearer)]).status, 200);
    // DNS rebinding: the right token, but another site's name in Host.
    let rebound =
        request(ui.port, "GET", "/api/runs", "evil.example:80", &[("X-Sdbooth-Token", &ui.token)], None);
    assert_eq!(rebound.status, 403);
    let other_port = request(ui.port, "GET", "/", "127.0.0.1:1", &[("X-Sdbooth-Token", &ui.token)], None);
    assert_eq!(other_port.status, 403);
    assert_eq!(
        request(ui.port, "GET", "/", &format!("localhost:{}", ui.port), &[("Cookie", &cookie)], None).status,
        200
    );
    // A state change with the cookie alone (what a cross-site form could send): refused.
    let body = toy_setup(10, json!({}));
    let csrf = request(ui.port, "POST", "/api/runs", &host, &[("Cookie", &cookie)], Some(&body));
    assert_eq!(csrf.status, 403, "{}", csrf.body);
    let by_query =
        request(ui.port, "POST", &format!("/api/check?token={}", ui.token), &host, &[], Some(&body));
    assert_eq!(by_query.status, 403);
    // State changes are POSTs only.
    assert_eq!(ui.get("/api/check").status, 405);
    assert!(std::fs::read_dir(dir.path().join("runs")).unwrap().next().is_none(), "nothing was started");
}

#[test]
fn schema_lists_the_cli_flags_by_group_with_presets() {
    let dir = tempfile::tempdir().unwrap();
    let ui = start_ui(dir.path(), 0, &dir.path().join("runs"));
    let s = ui.get("/api/schema").json();
    let flags = s["flags"].as_array().unwrap();
    let lr = flags.iter().find(|f| f["name"] == "learning_rate").unwrap();
    assert_eq!((lr["group"].as_str(), lr["default"].as_str()), (Some("Optimizer"), Some("0.000002")));
    let presets = s["presets"].as_array().unwrap();
    assert_eq!(presets.len(), 3);
    let models = ui.get("/api/models").json();
    assert!(models.as_array().unwrap().iter().any(|m| m["value"] == "builtin:tiny-sd1"));
}

#[test]
fn dry_run_of_the_toy_dataset_and_the_cli_messages() {
    let dir = tempfile::tempdir().unwrap();
    let ui = start_ui(dir.path(), 0, &dir.path().join("runs"));
    let mut setup = toy_setup(30, json!({"sample_every_n_steps": "10"}));
    setup["sample_prompts"] = json!("a photo of sks dog --w 64 --h 64 --s 2");
    let r = ui.post("/api/check", &setup);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    let report = &r["report"];
    assert_eq!(report["ok"], true, "{report:#}");
    let dry = &report["dry_run"];
    assert_eq!(dry["steps"]["max_train_steps"], 30);
    let subsets = dry["datasets"][0]["subsets"].as_array().unwrap();
    assert_eq!(subsets.len(), 2);
    assert!(subsets.iter().any(|s| s["is_reg"] == true && s["class_tokens"] == "dog"));
    assert!(!dry["datasets"][0]["buckets"].as_array().unwrap().is_empty());
    let toml = report["config_toml"].as_str().unwrap();
    assert!(toml.contains("max_train_steps = 30") && toml.contains("[optimizer]"), "{toml}");
    let cmd = r["prepared"]["command"].as_str().unwrap();
    assert!(cmd.starts_with(&format!("cd {} && sdbooth train ", toy().display())), "{cmd}");
    assert!(cmd.contains("--max_train_steps=30"));
    // The check leaves no run, and no folder, behind.
    assert!(ui.get("/api/runs").json()["runs"].as_array().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".checks")
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A flag training refuses: the CLI's message.
    let r = ui.post("/api/check", &toy_setup(30, json!({"full_fp16": true}))).json();
    assert_eq!(r["report"]["ok"], false);
    let refusals = r["report"]["refusals"].as_array().unwrap();
    assert!(refusals.iter().any(|m| m.as_str().unwrap().contains("--full_fp16")), "{refusals:?}");
    // A value clap rejects: clap's message.
    let r = ui.post("/api/check", &toy_setup(30, json!({"mixed_precision": "fp32"}))).json();
    assert!(r["report"]["parse_error"].as_str().unwrap().contains("fp32"));
    // A dataset the dry run rejects: its message, and no run starts.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"nope\"\nnum_repeats = 1\n",
    )
    .unwrap();
    let r =
        ui.post("/api/check", &toy_setup(30, json!({"dataset_config": bad.display().to_string()}))).json();
    assert_eq!(r["report"]["dry_run_ok"], false);
    assert!(r["report"]["dry_run_messages"].to_string().contains("nope"), "{:#}", r["report"]);
    let refused = ui.post("/api/runs", &toy_setup(30, json!({"dataset_config": bad.display().to_string()})));
    assert_eq!(refused.status, 422);
    // An unknown flag.
    let r = ui.post("/api/check", &toy_setup(30, json!({"learning_rat": "1"})));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("--learning_rat"));
}

#[test]
fn start_watch_stop_queue_resume_and_list_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ui = start_ui(dir.path(), 0, &dir.path().join("runs"));
    // A long run, and a second one queued behind it.
    let a = ui.post("/api/runs", &toy_setup(100_000, json!({"output_name": "long"})));
    assert_eq!(a.status, 201, "{}", a.body);
    let a = a.json()["id"].as_str().unwrap().to_string();
    let b = ui.post("/api/runs", &toy_setup(5, json!({"output_name": "next", "validation_split": "0.4"})));
    let b = b.json()["id"].as_str().unwrap().to_string();
    let d = ui.wait_run(&a, 180, "3 logged steps", |d| d["steps"].as_array().is_some_and(|s| s.len() >= 3));
    assert_eq!(d["meta"]["status"], "running");
    assert_eq!(d["meta"]["total_steps"], 100_000);
    assert!(d["log_tail"].as_array().is_some_and(|l| !l.is_empty()));
    let step = &d["steps"][0];
    assert!(step["loss"].is_number() && step["lr_unet"].is_number() && step["step_seconds"].is_number());
    let bd = ui.get(&format!("/api/runs/{b}")).json();
    assert_eq!((bd["meta"]["status"].as_str(), bd["queue_position"].as_u64()), (Some("queued"), Some(0)));

    // The event stream sends snapshots of the running run.
    let mut s = TcpStream::connect(("127.0.0.1", ui.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "GET /api/runs/{a}/events HTTP/1.1\r\nHost: {}\r\nX-Sdbooth-Token: {}\r\n\r\n",
        ui.host(),
        ui.token
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 8192];
    while !seen.contains("event: snapshot") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    drop(s);

    // Stop: the Ctrl-C path saves a state; the queued run starts after it.
    let r = ui.post(&format!("/api/runs/{a}/stop"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let d = ui.wait_run(&a, 120, "stopped", |d| d["meta"]["status"] == "stopped");
    let states = d["states"].as_array().unwrap();
    assert_eq!(states.len(), 1, "{d:#}");
    assert!(d["log_tail"].to_string().contains("interrupted after step"), "{}", d["log_tail"]);
    let stopped_at = d["steps"].as_array().unwrap().len();
    let bd = ui.wait_run(&b, 180, "the queued run finishes", |d| d["meta"]["status"] == "finished");
    // Validation loss (at the start and the end), from the run's validation log.
    let validation = bd["validation"].as_array().unwrap();
    assert!(!validation.is_empty() && validation.iter().all(|v| v["loss"].is_number()), "{validation:?}");
    let model = bd["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "next.safetensors")
        .expect("model");
    let download = ui.get(model["url"].as_str().unwrap());
    assert_eq!(download.status, 200);
    assert!(download.headers.contains("attachment"), "{}", download.headers);
    assert_eq!(ui.get(&format!("/runs/{b}/files/../../etc/passwd")).status, 404);

    // Resume from the saved state, then take it off the queue/stop again.
    let r = ui.post(&format!("/api/runs/{a}/resume"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let d = ui.wait_run(&a, 180, "resumed steps", |d| {
        d["steps"].as_array().is_some_and(|s| s.len() >= stopped_at + 2)
    });
    assert!(d["log_tail"].to_string().contains("resumed from"), "{}", d["log_tail"]);
    let command = d["command"].as_str().unwrap();
    assert!(command.contains("sdbooth train ") && command.contains("--resume="), "{command}");
    ui.post(&format!("/api/runs/{a}/stop"), &json!({}));
    ui.wait_run(&a, 120, "stopped again", |d| d["meta"]["status"] == "stopped");

    // A queued run can be taken off the queue.
    assert_eq!(ui.post(&format!("/api/runs/{a}/resume"), &json!({})).status, 200);
    ui.wait_run(&a, 120, "running again", |d| d["meta"]["status"] == "running");
    let c = ui.post("/api/runs", &toy_setup(100_000, json!({"output_name": "c"}))).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = ui.post(&format!("/api/runs/{c}/stop"), &json!({})).json();
    assert_eq!(
        (r["result"].as_str(), r["meta"]["status"].as_str()),
        (Some("taken off the queue"), Some("cancelled"))
    );
    ui.post(&format!("/api/runs/{a}/stop"), &json!({}));
    ui.wait_run(&a, 120, "stopped a third time", |d| d["meta"]["status"] == "stopped");

    // The list, newest first, survives a restart of the UI.
    drop(ui);
    let ui = start_ui(dir.path(), 0, &dir.path().join("runs"));
    let runs = ui.get("/api/runs").json();
    let listed: Vec<(String, String)> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["meta"]["id"].as_str().unwrap().into(), r["meta"]["status"].as_str().unwrap().into()))
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed.contains(&(a.clone(), "stopped".into())) && listed.contains(&(b.clone(), "finished".into()))
    );
    let b_entry = runs["runs"].as_array().unwrap().iter().find(|r| r["meta"]["id"] == b.as_str()).unwrap();
    assert_eq!(b_entry["last_step"]["step"], 5);
    let report = b_entry["report"].as_str().expect("report.html of the finished run");
    let page = ui.get(report);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<html"), "{}", &page.body[..page.body.len().min(200)]);
}
