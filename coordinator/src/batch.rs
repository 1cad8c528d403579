//! OpenAI's Batch API for large jobs: upload a JSONL file of requests (`POST /v1/files`),
//! start a batch over it (`POST /v1/batches`), poll it (`GET /v1/batches/{id}`) and download
//! the output file (`GET /v1/files/{id}/content`). Each line becomes one job of verified units;
//! files live in the database, so any coordinator sharing it can serve them, and a restart
//! loses nothing.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Multipart, Path, State as Extract},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use sqlx::Row;

use crate::{
    api::{ApiError, ApiJson, ENDPOINTS, authorize, owner_of as owner, prepare, render},
    db::{now_ms, random_id},
    scheduler::State,
};

type ApiResult<T> = Result<T, ApiError>;

/// The largest uploaded file, and the most requests in one batch.
pub const MAX_FILE_BYTES: usize = 64 << 20;
pub const MAX_BATCH_LINES: usize = 50_000;

async fn store_file(
    state: &State,
    owner: &str,
    purpose: &str,
    filename: &str,
    content: &str,
) -> ApiResult<Value> {
    let id = random_id("file");
    let now = now_ms();
    let _w = state.db.write().await;
    sqlx::query(
        "INSERT INTO files (id, owner, purpose, filename, bytes, content, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(owner)
    .bind(purpose)
    .bind(filename)
    .bind(content.len() as i64)
    .bind(content)
    .bind(now)
    .execute(&state.db.pool)
    .await
    .map_err(crate::CoordinatorError::from)?;
    Ok(file_object(
        &id,
        purpose,
        filename,
        content.len() as i64,
        now,
    ))
}

fn file_object(id: &str, purpose: &str, filename: &str, bytes: i64, created_ms: i64) -> Value {
    json!({ "id": id, "object": "file", "bytes": bytes, "created_at": created_ms / 1000,
            "filename": filename, "purpose": purpose, "status": "processed" })
}

pub async fn upload(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> ApiResult<Json<Value>> {
    let key = authorize(&state, &headers).await?;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("bad multipart body: {e}"), None))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| {
                    ApiError::invalid(format!("bad `purpose`: {e}"), Some("purpose"))
                })?)
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| {
                    ApiError::invalid(format!("cannot read the file: {e}"), Some("file"))
                })?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("the form needs a `purpose` field", Some("purpose")))?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            "only `purpose: batch` files are accepted",
            Some("purpose"),
        ));
    }
    let (name, bytes) =
        file.ok_or_else(|| ApiError::invalid("the form needs a `file` field", Some("file")))?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::invalid("the file must be UTF-8 JSONL", Some("file")))?;
    let name: String = name.chars().take(200).collect();
    Ok(Json(
        store_file(&state, &owner(&key), &purpose, &name, &text).await?,
    ))
}

async fn load_file(state: &State, owner: &str, id: &str) -> ApiResult<(Value, String)> {
    let row = sqlx::query(
        "SELECT purpose, filename, bytes, content, created_ms FROM files WHERE id = $1 AND owner = $2",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&state.db.pool)
    .await
    .map_err(crate::CoordinatorError::from)?
    .ok_or_else(|| ApiError::not_found(format!("no file `{}`", id.chars().take(80).collect::<String>())))?;
    let get = |c: &str| {
        row.try_get::<String, _>(c)
            .map_err(crate::CoordinatorError::from)
    };
    let object = file_object(
        id,
        &get("purpose")?,
        &get("filename")?,
        row.try_get("bytes")
            .map_err(crate::CoordinatorError::from)?,
        row.try_get("created_ms")
            .map_err(crate::CoordinatorError::from)?,
    );
    Ok((object, get("content")?))
}

pub async fn file_info(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let key = authorize(&state, &headers).await?;
    Ok(Json(load_file(&state, &owner(&key), &id).await?.0))
}

pub async fn file_content(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let key = authorize(&state, &headers).await?;
    let (_, content) = load_file(&state, &owner(&key), &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], content).into_response())
}

pub async fn create(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    let key = authorize(&state, &headers).await?;
    let owner = owner(&key);
    let field = |name: &'static str| {
        body.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(format!("`{name}` is required"), Some(name)))
    };
    let input = field("input_file_id")?;
    let endpoint = field("endpoint")?;
    if !ENDPOINTS.contains(&endpoint) {
        return Err(ApiError::invalid(
            format!("`endpoint` must be one of {}", ENDPOINTS.join(", ")),
            Some("endpoint"),
        ));
    }
    if field("completion_window")? != "24h" {
        return Err(ApiError::invalid(
            "`completion_window` must be \"24h\"",
            Some("completion_window"),
        ));
    }
    let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
    let (_, content) = load_file(&state, &owner, input).await?;
    let mut lines = Vec::new();
    let mut custom_ids = std::collections::HashSet::new();
    for (n, line) in content
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if lines.len() >= MAX_BATCH_LINES {
            return Err(ApiError::invalid(
                format!("a batch holds at most {MAX_BATCH_LINES} requests"),
                Some("input_file_id"),
            ));
        }
        let bad =
            |m: String| ApiError::invalid(format!("line {}: {m}", n + 1), Some("input_file_id"));
        let request: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let custom_id = request
            .get("custom_id")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty() && c.len() <= 200)
            .ok_or_else(|| bad("`custom_id` must be a string of 1 to 200 bytes".into()))?;
        if !custom_ids.insert(custom_id.to_string()) {
            return Err(bad(format!("`custom_id` {custom_id} appears twice")));
        }
        if request.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(bad("`method` must be POST".into()));
        }
        if request.get("url").and_then(Value::as_str) != Some(endpoint) {
            return Err(bad(format!(
                "`url` must be the batch's endpoint {endpoint}"
            )));
        }
        let req_body = request
            .get("body")
            .filter(|b| b.is_object())
            .ok_or_else(|| bad("`body` must be an object".into()))?;
        lines.push((custom_id.to_string(), req_body.clone()));
    }
    if lines.is_empty() {
        return Err(ApiError::invalid(
            "the input file has no requests",
            Some("input_file_id"),
        ));
    }
    // Each line becomes a job now; a line the API would refuse is answered in the error file.
    let mut entries = Vec::new();
    for (custom_id, req_body) in lines {
        let entry = match prepare(&state, endpoint, &req_body) {
            Ok(p) if p.stream => json!({ "custom_id": custom_id, "body": req_body,
                "error": { "code": "invalid_request", "message": "`stream` is not allowed in a batch" } }),
            Ok(p) => {
                let job = state
                    .create_job(
                        crate::scheduler::NewJob {
                            kind: p.kind,
                            model: &p.model.name,
                            precision: p.precision,
                            owner: &owner,
                            idempotency_key: None,
                            fingerprint: None,
                            assurance: p.assurance,
                        },
                        p.tasks,
                    )
                    .await?;
                match job {
                    Ok(job) => json!({ "custom_id": custom_id, "body": req_body, "job": job }),
                    Err(why) => json!({ "custom_id": custom_id, "body": req_body,
                        "error": { "code": "quota_exceeded", "message": crate::api::refusal(why).message } }),
                }
            }
            Err(e) => json!({ "custom_id": custom_id, "body": req_body,
                "error": { "code": "invalid_request", "message": e.message } }),
        };
        entries.push(entry);
    }
    let id = random_id("batch");
    let now = now_ms();
    {
        let _w = state.db.write().await;
        sqlx::query(
            "INSERT INTO batches (id, owner, endpoint, input_file_id, status, entries, metadata, output_file_id, error_file_id, created_ms, completed_ms)
             VALUES ($1, $2, $3, $4, 'in_progress', $5, $6, NULL, NULL, $7, NULL)",
        )
        .bind(&id)
        .bind(&owner)
        .bind(endpoint)
        .bind(input)
        .bind(Value::Array(entries).to_string())
        .bind(metadata.to_string())
        .bind(now)
        .execute(&state.db.pool)
        .await
        .map_err(crate::CoordinatorError::from)?;
    }
    Ok(Json(refresh(&state, &owner, &id).await?))
}

pub async fn retrieve(
    Extract(state): Extract<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let key = authorize(&state, &headers).await?;
    Ok(Json(refresh(&state, &owner(&key), &id).await?))
}

/// The batch object, completing the batch (writing its output file) once every job is done.
async fn refresh(state: &State, owner: &str, id: &str) -> ApiResult<Value> {
    let db = |e: sqlx::Error| ApiError::from(crate::CoordinatorError::from(e));
    let row = sqlx::query(
        "SELECT endpoint, input_file_id, status, entries, metadata, output_file_id, error_file_id, created_ms, completed_ms FROM batches WHERE id = $1 AND owner = $2",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&state.db.pool)
    .await
    .map_err(db)?
    .ok_or_else(|| ApiError::not_found(format!("no batch `{}`", id.chars().take(80).collect::<String>())))?;
    let text = |c: &str| row.try_get::<String, _>(c).map_err(db);
    let opt = |c: &str| row.try_get::<Option<String>, _>(c).map_err(db);
    let corrupt =
        |e: serde_json::Error| ApiError::from(crate::CoordinatorError::Corrupt(e.to_string()));
    let endpoint = text("endpoint")?;
    let entries: Vec<Value> = serde_json::from_str(&text("entries")?).map_err(corrupt)?;
    let mut status = text("status")?;
    let (mut output_file, mut error_file) = (opt("output_file_id")?, opt("error_file_id")?);
    let mut completed_ms: Option<i64> = row.try_get("completed_ms").map_err(db)?;
    let failed = entries.iter().filter(|e| e.get("error").is_some()).count();
    let jobs: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.get("job").and_then(Value::as_str))
        .collect();
    let done = failed + state.jobs_done(&jobs).await?;
    if status == "in_progress" && done == entries.len() {
        let (mut out, mut err) = (String::new(), String::new());
        for e in &entries {
            let custom_id = e["custom_id"].as_str().unwrap_or_default();
            let request_id = random_id("req");
            if let Some(job) = e.get("job").and_then(Value::as_str) {
                let p = prepare(state, &endpoint, &e["body"])?;
                let body = render(&p, job, state.job_outputs(job).await?)?;
                out.push_str(&json!({ "id": request_id, "custom_id": custom_id,
                    "response": { "status_code": 200, "request_id": request_id, "body": body }, "error": null }).to_string());
                out.push('\n');
            } else {
                err.push_str(&json!({ "id": request_id, "custom_id": custom_id, "response": null, "error": e["error"] }).to_string());
                err.push('\n');
            }
        }
        let out_id = store_file(
            state,
            owner,
            "batch_output",
            &format!("{id}_output.jsonl"),
            &out,
        )
        .await?;
        output_file = out_id["id"].as_str().map(str::to_string);
        if !err.is_empty() {
            let err_id = store_file(
                state,
                owner,
                "batch_output",
                &format!("{id}_errors.jsonl"),
                &err,
            )
            .await?;
            error_file = err_id["id"].as_str().map(str::to_string);
        }
        let now = now_ms();
        let _w = state.db.write().await;
        sqlx::query(
            "UPDATE batches SET status = 'completed', output_file_id = $1, error_file_id = $2, completed_ms = $3 WHERE id = $4 AND status = 'in_progress'",
        )
        .bind(&output_file)
        .bind(&error_file)
        .bind(now)
        .bind(id)
        .execute(&state.db.pool)
        .await
        .map_err(db)?;
        status = "completed".into();
        completed_ms = Some(now);
    }
    let created_ms: i64 = row.try_get("created_ms").map_err(db)?;
    Ok(json!({
        "id": id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": null,
        "input_file_id": text("input_file_id")?,
        "completion_window": "24h",
        "status": status,
        "output_file_id": output_file,
        "error_file_id": error_file,
        "created_at": created_ms / 1000,
        "in_progress_at": created_ms / 1000,
        "completed_at": completed_ms.map(|c| c / 1000),
        "request_counts": { "total": entries.len(), "completed": done - failed, "failed": failed },
        "metadata": serde_json::from_str::<Value>(&text("metadata")?).map_err(corrupt)?,
    }))
}
