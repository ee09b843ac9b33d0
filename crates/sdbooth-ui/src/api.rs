//! The HTTP routes. Everything passes the token/Host guard (auth.rs); what changes anything is
//! a POST.
//!
//! - `GET /`, `/app.js`, `/style.css`: the page, embedded in the binary.
//! - `GET /api/schema`: flags by `--help` group, presets. `GET /api/models`: base models found.
//! - `POST /api/check`: command line, `--config_file` TOML, refusals and the dry run.
//! - `GET /api/runs`, `POST /api/runs` (queue a run), `GET /api/runs/{id}`,
//!   `GET /api/runs/{id}/events` (SSE), `POST /api/runs/{id}/stop`, `POST /api/runs/{id}/resume`.
//! - `GET /runs/{id}/files/{path}`: samples, models, report.html, train.log of a run.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::check::{self, SetupRequest};
use crate::queue::{self, StopOutcome};
use crate::runs::{self, RunMeta, Status};
use crate::{auth, flags, models, watch, AppState};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }),
        )
        .route("/api/schema", get(schema))
        .route("/api/models", get(model_choices))
        .route("/api/check", post(check_setup))
        .route("/api/runs", get(list_runs).post(create_run))
        .route("/api/runs/{id}", get(run_detail))
        .route("/api/runs/{id}/events", get(run_events))
        .route("/api/runs/{id}/stop", post(stop_run))
        .route("/api/runs/{id}/resume", post(resume_run))
        .route("/runs/{id}/files/{*path}", get(run_file))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The page, with the token for the X-Sdbooth-Token header of its POSTs.
async fn index(State(state): State<Arc<AppState>>) -> Html<String> {
    Html(
        INDEX_HTML
            .replace("{{TOKEN}}", &state.token)
            .replace("{{WORKDIR}}", &html_escape(&state.workdir.display().to_string())),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

async fn schema(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "flags": flags::flag_schema(),
        "presets": flags::PRESETS,
        "workdir": state.workdir,
        "cwd": state.cwd,
        "toy_example": state.cwd.join("examples/toy").is_dir().then(|| state.cwd.join("examples/toy")),
    }))
}

async fn model_choices(State(state): State<Arc<AppState>>) -> Json<Vec<models::ModelChoice>> {
    let roots = [state.cwd.as_path(), state.workdir.as_path()];
    Json(models::choices(&roots))
}

async fn check_setup(State(state): State<Arc<AppState>>, Json(req): Json<SetupRequest>) -> Response {
    let name = req.flags.get("output_name").and_then(|v| v.as_str()).unwrap_or("model").to_string();
    // The run folder a run of this set-up would get (not created by a check).
    let run_dir = state.workdir.join(runs::new_run_id(&state.workdir, &name));
    let response = match check::prepare(&req, &state.cwd, &run_dir) {
        Ok(prepared) => {
            let report = check::check(&state.exe, &state.workdir, &prepared).await;
            Json(json!({ "prepared": prepared, "report": report })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    };
    // prepare() may have written prompts.txt there; a run started later gets its own folder.
    if !run_dir.join(runs::META_FILE).exists() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    response
}

async fn create_run(State(state): State<Arc<AppState>>, Json(req): Json<SetupRequest>) -> Response {
    let name = req.flags.get("output_name").and_then(|v| v.as_str()).filter(|s| !s.trim().is_empty());
    let id = runs::new_run_id(&state.workdir, name.unwrap_or("model"));
    let run_dir = state.workdir.join(&id);
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot create {}: {e}", run_dir.display()));
    }
    let prepared = match check::prepare(&req, &state.cwd, &run_dir) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&run_dir);
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let report = check::check(&state.exe, &state.workdir, &prepared).await;
    if !report.ok {
        let _ = std::fs::remove_dir_all(&run_dir);
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "the checks failed", "report": report })),
        )
            .into_response();
    }
    let mut meta =
        RunMeta::new(id.clone(), prepared.cwd, prepared.output_dir, prepared.output_name, Status::Queued);
    meta.argv = prepared.argv;
    meta.total_steps = check::total_steps(&report);
    if let Err(e) = meta.save(&state.workdir) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot write run.json: {e}"));
    }
    state.queue.push(id);
    (StatusCode::CREATED, Json(meta)).into_response()
}

async fn list_runs(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let runs: Vec<serde_json::Value> = runs::list(&state.workdir)
        .into_iter()
        .rev()
        .map(|m| {
            let (steps, _, _) = watch::read_jsonl_from(&m.jsonl(), 0);
            let last = steps.last().cloned();
            let report = m
                .output_dir
                .join("report.html")
                .is_file()
                .then(|| format!("/runs/{}/files/report.html", m.id));
            json!({
                "queue_position": state.queue.position(&m.id),
                "last_step": last,
                "report": report,
                "meta": m,
            })
        })
        .collect();
    Json(json!({ "runs": runs }))
}

/// Run `id` of the workdir; an id is one folder name of it.
fn load_run(state: &AppState, id: &str) -> Option<RunMeta> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return None;
    }
    runs::load(&state.workdir.join(id))
}

fn no_run(id: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no run {id:?} in the workdir"))
}

async fn run_detail(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    match load_run(&state, &id) {
        Some(meta) => Json(watch::snapshot(&state, meta, 0)).into_response(),
        None => no_run(&id),
    }
}

async fn run_events(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    if load_run(&state, &id).is_none() {
        return no_run(&id);
    }
    Sse::new(watch::events(state, id)).keep_alive(KeepAlive::default()).into_response()
}

async fn stop_run(State(state): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    if load_run(&state, &id).is_none() {
        return no_run(&id);
    }
    let outcome = state.queue.update(&id, |meta| queue::stop(&state.queue, meta));
    match outcome {
        Some((meta, Ok(o))) => {
            let what = match o {
                StopOutcome::Cancelled => "taken off the queue",
                StopOutcome::Signalled => "stopping: the step in progress finishes, then a state is saved",
                StopOutcome::AlreadyStopping => "already stopping",
                StopOutcome::NotActive => "not running",
            };
            Json(json!({ "result": what, "meta": meta })).into_response()
        }
        Some((_, Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        None => error(StatusCode::NOT_FOUND, format!("no run {id}")),
    }
}

#[derive(Deserialize, Default)]
struct ResumeRequest {
    /// A `*-state` folder of the run's output folder; default: the newest.
    #[serde(default)]
    state: Option<String>,
}

async fn resume_run(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    body: Option<Json<ResumeRequest>>,
) -> Response {
    let Some(meta) = load_run(&state, &id) else { return no_run(&id) };
    if meta.status == Status::External || meta.is_active() {
        return error(StatusCode::CONFLICT, "only a stopped, failed or finished run of this UI resumes");
    }
    let (_, states) = watch::outputs(&meta);
    let wanted = body.and_then(|Json(b)| b.state);
    // kohya's state names sort by step within a run; the newest folder is the latest state.
    let newest = states
        .iter()
        .filter_map(|s| {
            let path = meta.output_dir.join(&s.name);
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
            Some((modified, s.name.clone()))
        })
        .max()
        .map(|(_, name)| name);
    let Some(chosen) = wanted.or(newest) else {
        return error(
            StatusCode::CONFLICT,
            "this run saved no state to resume from (--save_state, or stop it)",
        );
    };
    if !states.iter().any(|s| s.name == chosen) {
        return error(StatusCode::BAD_REQUEST, format!("{chosen} is not a state of this run"));
    }
    let path = meta.output_dir.join(&chosen).display().to_string();
    let updated = state.queue.update(&id, |m| {
        m.status = Status::Queued;
        m.resume_from = Some(path);
        m.stop_requested = false;
    });
    state.queue.push(id);
    match updated {
        Some((m, ())) => Json(m).into_response(),
        None => error(StatusCode::NOT_FOUND, "run vanished"),
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "json" | "jsonl" => "application/json",
        "log" | "txt" | "toml" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

async fn run_file(
    State(state): State<Arc<AppState>>,
    UrlPath((id, rel)): UrlPath<(String, String)>,
) -> Response {
    let Some(meta) = load_run(&state, &id) else { return no_run(&id) };
    let Some(path) = runs::resolve_file(&meta, &state.workdir, &rel) else {
        return error(StatusCode::NOT_FOUND, format!("{rel}: no such file in this run"));
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::NOT_FOUND, format!("{rel}: {e}")),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let ctype = content_type(&name);
    // Models stream in chunks (gigabytes); they download under their own name.
    let body = Body::from_stream(chunks(file));
    let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, ctype)], body).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&len.to_string()) {
        resp.headers_mut().insert(header::CONTENT_LENGTH, v);
    }
    if ctype == "application/octet-stream" {
        let disposition = format!("attachment; filename=\"{}\"", name.replace('"', "_"));
        if let Ok(v) = header::HeaderValue::from_str(&disposition) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    resp
}

fn chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
