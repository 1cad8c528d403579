//! The HTTP API: OpenAI-compatible requester endpoints behind API keys, the public ledger,
//! content-addressed weights, the worker socket, health, metrics and the OpenAPI document.
//! Every error is OpenAI's JSON shape with a 4xx/5xx status and a message that says what to
//! do next.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use axum::{
    Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State as Extract,
        WebSocketUpgrade, rejection::JsonRejection,
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response, Sse, sse::Event},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};
use tabula_protocol::{Hash, Precision, Task, UnitOutput};

use crate::{
    models::{ModelKind, ServedModel},
    scheduler::{Assurance, State},
};

pub(crate) type AppState = Arc<State>;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    pub(crate) message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: Some("not_found"),
        }
    }
}

impl From<crate::CoordinatorError> for ApiError {
    fn from(e: crate::CoordinatorError) -> Self {
        tracing::error!("request failed: {e}");
        if crate::db::is_storage_full(&e) {
            return Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: "the coordinator's disk is full, so it cannot record new work; retry \
                          later (GET /healthz says when it writes again)"
                    .into(),
                param: None,
                code: Some("storage_full"),
            };
        }
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: "the coordinator failed to handle this request; it is logged, retry later"
                .into(),
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }})),
        )
            .into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            // Every limit says when to come back.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json` whose rejections (bad JSON, wrong content type, too large) are OpenAI errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status();
                let message = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => {
                        "send the body as JSON with `Content-Type: application/json`".to_string()
                    }
                    _ => format!("invalid JSON body: {}", rejection.body_text()),
                };
                Err(ApiError {
                    status: if status == StatusCode::PAYLOAD_TOO_LARGE {
                        status
                    } else {
                        StatusCode::BAD_REQUEST
                    },
                    kind: "invalid_request_error",
                    message,
                    param: None,
                    code: None,
                })
            }
        }
    }
}

/// The largest JSON request body.
const MAX_BODY: usize = 4 << 20;
const MAX_INPUTS: usize = 2048;
const MAX_PROMPTS: usize = 16;
const MAX_TEXT_BYTES: usize = 64 << 10;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}/pieces", get(model_pieces))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route(
            "/v1/files",
            post(crate::batch::upload).layer(DefaultBodyLimit::max(crate::batch::MAX_FILE_BYTES)),
        )
        .route("/v1/files/{id}", get(crate::batch::file_info))
        .route("/v1/files/{id}/content", get(crate::batch::file_content))
        .route("/v1/batches", post(crate::batch::create))
        .route("/v1/batches/{id}", get(crate::batch::retrieve))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/ledger", get(ledger_list))
        .route("/v1/ledger/{id}", get(ledger))
        .route("/v1/ledger/proof/{address}", get(ledger_proof))
        .route("/v1/ledger/claim/{address}", post(ledger_claim))
        .route("/v1/ledger/epochs/{epoch}", get(ledger_epoch))
        .route("/v1/weights/{sha256}", get(weights))
        .route("/v1/worker", get(worker_socket))
        .fallback(crate::site::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// 200 when the database takes writes, else 503 with what fails (`database_writes`), so a
/// load balancer or an operator sees a full disk before requesters do.
async fn healthz(Extract(state): Extract<AppState>) -> Response {
    let writes = state.db.check_writes().await;
    let body = json!({
        "status": if writes.is_ok() { "ok" } else { "failing" },
        "database_writes": writes.as_ref().err().map_or("ok", String::as_str),
        "workers_connected": state.metrics.workers_connected.load(Ordering::Relaxed),
        "database": format!("{:?}", state.db.flavor).to_lowercase(),
    });
    let status = match writes {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(body)).into_response()
}

async fn metrics(Extract(state): Extract<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    let counters = [
        (
            "tabula_leases_granted_total",
            "Leases handed to workers",
            &m.leases_granted,
        ),
        (
            "tabula_leases_released_total",
            "Leases given back unfinished by stopping workers",
            &m.leases_released,
        ),
        (
            "tabula_grants_limited_total",
            "Requests for units refused at a limit (a key's or a network's lease cap, abandoned leases)",
            &m.grants_limited,
        ),
        (
            "tabula_logins_limited_total",
            "Logins of new worker keys refused by a network's rate limit",
            &m.logins_limited,
        ),
        (
            "tabula_units_audited_total",
            "Verified units the referee re-executed after the fact",
            &m.units_audited,
        ),
        (
            "tabula_audits_failed_total",
            "Audits that found a verified output wrong",
            &m.audits_failed,
        ),
        (
            "tabula_workers_caught_total",
            "Worker keys banned because an audit caught them",
            &m.workers_caught,
        ),
        (
            "tabula_leases_canary_total",
            "Leases of known-answer canary units",
            &m.leases_canary,
        ),
        (
            "tabula_units_solo_total",
            "Units run unreplicated by a trusted worker",
            &m.units_solo,
        ),
        (
            "tabula_units_stalled_total",
            "Units the referee finished because no other worker took them within --replica-wait-secs",
            &m.units_stalled,
        ),
        (
            "tabula_leases_expired_total",
            "Leases that ran past their deadline",
            &m.leases_expired,
        ),
        (
            "tabula_results_submitted_total",
            "Results received",
            &m.results_submitted,
        ),
        (
            "tabula_results_rejected_total",
            "Results refused on receipt",
            &m.results_rejected,
        ),
        (
            "tabula_results_wrong_total",
            "Results that disagreed with the verified output",
            &m.results_wrong,
        ),
        (
            "tabula_units_verified_total",
            "Units verified",
            &m.units_verified,
        ),
        (
            "tabula_units_refereed_total",
            "Units re-executed by the coordinator",
            &m.units_refereed,
        ),
        ("tabula_jobs_created_total", "Jobs created", &m.jobs_created),
        (
            "tabula_journal_batches_total",
            "Scheduler transactions committed (each groups every decision that was waiting)",
            &state.journal_stats().batches,
        ),
        (
            "tabula_journal_entries_total",
            "Scheduler decisions committed",
            &state.journal_stats().entries,
        ),
        (
            "tabula_journal_commit_microseconds_total",
            "Time spent committing scheduler transactions",
            &state.journal_stats().commit_us,
        ),
        (
            "tabula_pipeline_sessions_started_total",
            "Generations run as pipeline sessions (layers split over several workers)",
            &state.pipelines.metrics.sessions_started,
        ),
        (
            "tabula_pipeline_sessions_finished_total",
            "Pipeline sessions whose every token was agreed",
            &state.pipelines.metrics.sessions_finished,
        ),
        (
            "tabula_pipeline_sessions_failed_total",
            "Pipeline sessions that ended without a result",
            &state.pipelines.metrics.sessions_failed,
        ),
        (
            "tabula_pipeline_steps_agreed_total",
            "Tokens on which every pipeline of a session agreed",
            &state.pipelines.metrics.steps_agreed,
        ),
        (
            "tabula_pipeline_stage_disputes_total",
            "Steps where pipelines disagreed and a stage was re-executed",
            &state.pipelines.metrics.stage_disputes,
        ),
        (
            "tabula_pipeline_stage_liars_total",
            "Stage members caught lying (by re-execution or by their own signatures)",
            &state.pipelines.metrics.stage_liars,
        ),
        (
            "tabula_pipeline_rebuilds_total",
            "Pipelines rebuilt after a member left, stalled or lied",
            &state.pipelines.metrics.rebuilds,
        ),
        (
            "tabula_pipeline_audits_total",
            "Pipeline sessions the coordinator re-executed whole (referee assurance, audits)",
            &state.pipelines.metrics.audits,
        ),
        (
            "tabula_pipeline_audit_catches_total",
            "Re-executed sessions whose pipelines had agreed on a wrong result",
            &state.pipelines.metrics.audit_catches,
        ),
        (
            "tabula_pipeline_stage_failures_total",
            "Stage members that failed, left or stalled a session",
            &state.pipelines.metrics.stage_failures,
        ),
        (
            "tabula_pipeline_cooldowns_total",
            "Stage workers kept out of placement for a while for failing sessions again and again",
            &state.pipelines.metrics.cooldowns,
        ),
        (
            "tabula_pipeline_spot_checks_total",
            "Stages of lone trusted pipelines re-executed at random",
            &state.pipelines.metrics.spot_checks,
        ),
        (
            "tabula_pipeline_links_direct_total",
            "Stage-to-stage links that came up as direct WebRTC data channels",
            &state.pipelines.metrics.links_direct,
        ),
        (
            "tabula_pipeline_links_relayed_total",
            "Stage-to-stage links relayed through the coordinator",
            &state.pipelines.metrics.links_relayed,
        ),
        (
            "tabula_pipeline_relayed_bytes_total",
            "Activation bytes relayed through the coordinator",
            &state.pipelines.metrics.relayed_bytes,
        ),
    ];
    let mut text = String::new();
    for (name, help, value) in counters {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            value.load(Ordering::Relaxed)
        ));
    }
    text.push_str(&format!(
        "# HELP tabula_workers_connected Worker sessions open now\n# TYPE tabula_workers_connected gauge\ntabula_workers_connected {}\n",
        m.workers_connected.load(Ordering::Relaxed)
    ));
    text.push_str(&format!(
        "# HELP tabula_units_in_memory Units the scheduler holds in memory (open, refereed, recent)
# TYPE tabula_units_in_memory gauge
tabula_units_in_memory {}
",
        state.units_in_memory()
    ));
    text.push_str(&format!(
        "# HELP tabula_session_senders Worker sessions the coordinator holds a sender for (open ones)
# TYPE tabula_session_senders gauge
tabula_session_senders {}
",
        state.session_senders()
    ));
    let (disputes, audits) = state.referee_backlog();
    text.push_str(&format!(
        "# HELP tabula_referee_disputes_waiting Units waiting for the referee to settle them (jobs wait on these)
# TYPE tabula_referee_disputes_waiting gauge
tabula_referee_disputes_waiting {disputes}
# HELP tabula_referee_audits_waiting Verified units waiting for an audit
# TYPE tabula_referee_audits_waiting gauge
tabula_referee_audits_waiting {audits}
"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn list_models(Extract(state): Extract<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .registry()
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "tabula",
                "kind": match m.kind { ModelKind::Embedding { .. } => "embedding", ModelKind::Generation { .. } => "generation" },
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// A generation model's exact file as per-layer pieces, for a pipeline stage that fetches only
/// its slice (each at `/v1/weights/{sha256}`, checked by its hash).
async fn model_pieces(
    Extract(state): Extract<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let registry = state.registry();
    let model = registry.find(&name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no model named {name:?}; served: {}",
            registry.names().join(", ")
        ))
    })?;
    let ModelKind::Generation { layers, .. } = &model.kind else {
        return Err(ApiError::invalid(
            format!(
                "{} is an embedding model; only generation models are cut into pipeline pieces",
                model.name
            ),
            None,
        ));
    };
    let exact = model.model_ref(Precision::Exact);
    Ok(Json(json!({
        "model": model.name,
        "exact_sha256": exact.files[0].sha256.to_hex(),
        "layers": layers,
        "pieces": model.pieces,
    })))
}

pub(crate) async fn authorize(state: &State, headers: &HeaderMap) -> ApiResult<String> {
    let unauthorized = |message: &str| ApiError {
        status: StatusCode::UNAUTHORIZED,
        kind: "invalid_request_error",
        message: message.into(),
        param: None,
        code: Some("invalid_api_key"),
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            unauthorized(
                "missing API key: send `Authorization: Bearer KEY`; create one with `tabula keys create`",
            )
        })?;
    let key = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    if key.len() > 200 || !state.db.api_key_valid(key).await? {
        return Err(unauthorized(
            "invalid API key; create one with `tabula keys create`",
        ));
    }
    Ok(key.to_string())
}

/// The API error for a job that was not created.
pub(crate) fn refusal(why: crate::scheduler::JobRefused) -> ApiError {
    use crate::scheduler::JobRefused;
    match why {
        JobRefused::Conflict(existing) => ApiError {
            status: StatusCode::CONFLICT,
            kind: "invalid_request_error",
            message: format!(
                "this Idempotency-Key was used for another request (job {existing}, a different endpoint or body); use a new key for a new request"
            ),
            param: None,
            code: Some("idempotency_key_reused"),
        },
        JobRefused::Quota { queued, limit } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: format!(
                "this API key has {queued} units queued and may have {limit}; wait for its jobs to finish, or ask the operator for a larger --max-queued-units"
            ),
            param: None,
            code: Some("quota_exceeded"),
        },
        JobRefused::RefereeQuota { queued, limit } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: format!(
                "this API key has {queued} units at \"referee\" assurance waiting and may have {limit} (each is computed by the coordinator itself); wait for them, send fewer, use \"high\", or ask the operator for a larger --max-referee-units"
            ),
            param: Some("assurance"),
            code: Some("quota_exceeded"),
        },
    }
}

/// Who owns a job: the SHA-256 of the API key that created it (never the key itself).
pub(crate) fn owner_of(api_key: &str) -> String {
    tabula_protocol::sha256(api_key.as_bytes()).to_hex()
}

/// The idempotency key of a request, scoped to the API key that sent it.
fn idempotency(headers: &HeaderMap, api_key: &str) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 200)
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key must be 1 to 200 visible characters", None)
                })?;
            Ok(Some(format!(
                "{}:{v}",
                &tabula_protocol::sha256(api_key.as_bytes()).to_hex()[..16]
            )))
        }
    }
}

fn find_model(state: &State, body: &Value, want: &str) -> ApiResult<Arc<ServedModel>> {
    let name = body.get("model").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "`model` is required (a string); see GET /v1/models",
            Some("model"),
        )
    })?;
    let registry = state.registry();
    let model = registry.find(name).cloned().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!(
            "the model `{}` does not exist; available: {}",
            name.chars().take(100).collect::<String>(),
            registry.names().join(", ")
        ),
        param: Some("model"),
        code: Some("model_not_found"),
    })?;
    let ok = matches!(
        (&model.kind, want),
        (ModelKind::Embedding { .. }, "embedding") | (ModelKind::Generation { .. }, "generation")
    );
    if !ok {
        return Err(ApiError::invalid(
            format!(
                "`{}` is not a{} model",
                model.name,
                if want == "embedding" {
                    "n embedding"
                } else {
                    " text generation"
                }
            ),
            Some("model"),
        ));
    }
    Ok(model)
}

fn precision(body: &Value) -> ApiResult<Precision> {
    match body.get("precision") {
        None | Some(Value::Null) => Ok(Precision::Exact),
        Some(Value::String(s)) if s == "exact" => Ok(Precision::Exact),
        Some(Value::String(s)) if s == "fast" => Ok(Precision::Fast),
        _ => Err(ApiError::invalid(
            "`precision` must be \"exact\" or \"fast\"",
            Some("precision"),
        )),
    }
}

/// `"assurance"`: how hard the results are checked (a Tabula extension; default standard).
fn assurance(body: &Value) -> ApiResult<Assurance> {
    match body.get("assurance") {
        None | Some(Value::Null) => Ok(Assurance::Standard),
        Some(Value::String(s)) => Assurance::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "`assurance` must be \"standard\", \"high\" (three workers on distinct networks must all agree) or \"referee\" (the coordinator re-executes every unit)",
                Some("assurance"),
            )
        }),
        _ => Err(ApiError::invalid(
            "`assurance` must be a string: \"standard\", \"high\" or \"referee\"",
            Some("assurance"),
        )),
    }
}

fn token_list(v: &Value, vocab: usize, param: &'static str) -> ApiResult<Vec<u32>> {
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::invalid("expected an array of token ids", Some(param)))?;
    items
        .iter()
        .map(|t| {
            t.as_u64()
                .filter(|&t| (t as usize) < vocab)
                .map(|t| t as u32)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("token ids must be integers from 0 to {}", vocab - 1),
                        Some(param),
                    )
                })
        })
        .collect()
}

fn check_text(s: &str, param: &'static str) -> ApiResult<()> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(ApiError::invalid(
            format!(
                "a text of {} bytes exceeds the limit of {MAX_TEXT_BYTES}",
                s.len()
            ),
            Some(param),
        ));
    }
    Ok(())
}

/// The answer to a request whose job did not finish within `--request-timeout-secs`.
fn pending(state: &State, job: &str) -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        kind: "timeout",
        message: format!(
            "job {job} is not verified yet ({} workers connected); it keeps running: \
             retry with the same Idempotency-Key to get its result, and start workers with \
             `tabula worker --coordinator URL`",
            state.metrics.workers_connected.load(Ordering::Relaxed)
        ),
        param: None,
        code: Some("job_pending"),
    }
}

/// Who asked for a job, and the request it is: its owner, idempotency key and fingerprint.
struct Requester {
    owner: String,
    idempotency_key: Option<String>,
    fingerprint: String,
}

impl Requester {
    fn of(headers: &HeaderMap, api_key: &str, endpoint: &str, body: &Value) -> ApiResult<Self> {
        Ok(Self {
            idempotency_key: idempotency(headers, api_key)?,
            fingerprint: tabula_protocol::sha256(format!("{endpoint}\n{body}").as_bytes()).to_hex(),
            owner: owner_of(api_key),
        })
    }

    fn new_job<'a>(&'a self, p: &'a Prepared) -> crate::scheduler::NewJob<'a> {
        crate::scheduler::NewJob {
            kind: p.kind,
            model: &p.model.name,
            precision: p.precision,
            owner: &self.owner,
            idempotency_key: self.idempotency_key.as_deref(),
            fingerprint: Some(&self.fingerprint),
            assurance: p.assurance,
        }
    }
}

/// Creates the job of `p` (a request to `endpoint` with `body`) and waits for its verified
/// outputs.
async fn run_job(
    state: &State,
    headers: &HeaderMap,
    api_key: &str,
    endpoint: &str,
    body: &Value,
    p: &Prepared,
) -> ApiResult<(String, Vec<UnitOutput>)> {
    let who = Requester::of(headers, api_key, endpoint, body)?;
    let new = who.new_job(p);
    let job = state
        .create_job(new, p.tasks.clone())
        .await?
        .map_err(refusal)?;
    let done = state
        .wait_job(&job, Duration::from_millis(state.config.request_timeout_ms))
        .await?;
    if !done {
        return Err(pending(state, &job));
    }
    let outputs = state.job_outputs(&job).await?;
    Ok((job, outputs))
}

fn micro(gflop: f64) -> i64 {
    (gflop * 1e6).round() as i64
}

/// A validated request: the units it becomes, and what its response needs.
pub struct Prepared {
    pub kind: &'static str,
    pub model: Arc<ServedModel>,
    pub precision: Precision,
    pub assurance: Assurance,
    pub tasks: Vec<(Task, i64)>,
    pub stream: bool,
    render: Render,
}

enum Render {
    Embeddings {
        base64: bool,
        tokens: usize,
    },
    Completion {
        stop: Vec<String>,
        prompt_tokens: usize,
    },
    Chat {
        stop: Vec<String>,
        prompt_tokens: usize,
    },
}

/// The endpoints a request (or a batch line) can address.
pub const ENDPOINTS: [&str; 3] = ["/v1/embeddings", "/v1/completions", "/v1/chat/completions"];

/// Validates a request body for `endpoint` and cuts it into units.
pub fn prepare(state: &State, endpoint: &str, body: &Value) -> ApiResult<Prepared> {
    match endpoint {
        "/v1/embeddings" => prepare_embeddings(state, body),
        "/v1/completions" => prepare_completion(state, body),
        "/v1/chat/completions" => prepare_chat(state, body),
        _ => Err(ApiError::invalid(
            format!(
                "unsupported endpoint `{endpoint}`; use one of {}",
                ENDPOINTS.join(", ")
            ),
            Some("endpoint"),
        )),
    }
}

/// A finished request's response body. Embedding lists are serialized straight from the
/// vectors: as a `Value` tree, a 2 048-input float response is some 25 MB of nodes.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum Rendered {
    Embeddings(EmbeddingList),
    Json(Value),
}

/// `{"object": "list", "data": [...], "model", "usage"}` of `/v1/embeddings`.
#[derive(serde::Serialize)]
pub struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(serde::Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(serde::Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Embedding {
    /// Written as the f64 of each f32, as `tabula embed` prints them (the same text as before
    /// this type existed, so clients comparing outputs exactly see no change).
    Floats(#[serde(serialize_with = "f32_as_f64")] Vec<f32>),
    Base64(String),
}

fn f32_as_f64<S: serde::Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|&x| f64::from(x)))
}

/// The response body of a finished request.
pub fn render(p: &Prepared, job: &str, outputs: Vec<UnitOutput>) -> ApiResult<Rendered> {
    match &p.render {
        Render::Embeddings { base64, tokens } => Ok(Rendered::Embeddings(render_embeddings(
            &p.model, outputs, *base64, *tokens,
        )?)),
        Render::Completion {
            stop,
            prompt_tokens,
        } => {
            let choices = choices(&p.model, outputs, stop)?;
            let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
            Ok(Rendered::Json(json!({
                "id": format!("cmpl-{job}"),
                "object": "text_completion",
                "created": now_s(),
                "model": p.model.name,
                "choices": choices.iter().enumerate().map(|(i, c)| json!({
                    "index": i, "text": c.text, "finish_reason": c.finish, "logprobs": null,
                })).collect::<Vec<_>>(),
                "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens },
            })))
        }
        Render::Chat {
            stop,
            prompt_tokens,
        } => {
            let choice = choices(&p.model, outputs, stop)?.remove(0);
            Ok(Rendered::Json(json!({
                "id": format!("chatcmpl-{job}"),
                "object": "chat.completion",
                "created": now_s(),
                "model": p.model.name,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": choice.text }, "finish_reason": choice.finish, "logprobs": null }],
                "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": choice.completion_tokens, "total_tokens": prompt_tokens + choice.completion_tokens },
            })))
        }
    }
}

/// The server-sent events of a finished streaming request.
fn stream_events(p: &Prepared, job: &str, outputs: Vec<UnitOutput>) -> ApiResult<Vec<Value>> {
    let name = &p.model.name;
    match &p.render {
        Render::Completion { stop, .. } => {
            let id = format!("cmpl-{job}");
            let mut events = Vec::new();
            for (i, c) in choices(&p.model, outputs, stop)?.iter().enumerate() {
                events.push(json!({ "id": id, "object": "text_completion", "created": now_s(), "model": name,
                    "choices": [{ "index": i, "text": c.text, "finish_reason": null, "logprobs": null }] }));
                events.push(json!({ "id": id, "object": "text_completion", "created": now_s(), "model": name,
                    "choices": [{ "index": i, "text": "", "finish_reason": c.finish, "logprobs": null }] }));
            }
            Ok(events)
        }
        Render::Chat { stop, .. } => {
            let id = format!("chatcmpl-{job}");
            let choice = choices(&p.model, outputs, stop)?.remove(0);
            let chunk = |delta: Value, finish: Value| {
                json!({ "id": id, "object": "chat.completion.chunk", "created": now_s(), "model": name,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
            };
            Ok(vec![
                chunk(json!({ "role": "assistant", "content": "" }), Value::Null),
                chunk(json!({ "content": choice.text }), Value::Null),
                chunk(json!({}), json!(choice.finish)),
            ])
        }
        Render::Embeddings { .. } => Err(ApiError::invalid(
            "embeddings do not stream",
            Some("stream"),
        )),
    }
}

/// The handler of the three synchronous endpoints.
async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    endpoint: &str,
    body: Value,
) -> ApiResult<Response> {
    let api_key = authorize(state, headers).await?;
    let p = prepare(state, endpoint, &body)?;
    if let Some(stages) = pipeline_stages(state, &p) {
        return run_pipeline(state, headers, &api_key, endpoint, &body, p, stages).await;
    }
    refuse_unplaceable(state, &p)?;
    let (job, outputs) = run_job(state, headers, &api_key, endpoint, &body, &p).await?;
    if p.stream {
        return Ok(sse(stream_events(&p, &job, outputs)?));
    }
    Ok(Json(render(&p, &job, outputs)?).into_response())
}

/// A request that no connected worker would be leased (every one of them declared a budget
/// too small for the model, or none takes its precision) is refused now, rather than left
/// to wait for its timeout. With no worker connected at all it waits: volunteers come and go.
fn refuse_unplaceable(state: &State, p: &Prepared) -> ApiResult<()> {
    let Some((task, _)) = p.tasks.first() else {
        return Ok(());
    };
    let Some(Err(why)) = state.some_worker_takes(task) else {
        return Ok(());
    };
    let name = &p.model.name;
    let precision = why.precision.as_str();
    let message = match why.largest_budget_mb {
        None => format!(
            "no connected worker computes {precision} precision, which this request asks for; \
             ask for the other precision, or start a worker with \
             `tabula worker --precision {precision}`"
        ),
        Some(largest) => {
            let split = if matches!(p.model.kind, ModelKind::Generation { .. })
                && !p.model.pieces.is_empty()
                && why.precision == Precision::Exact
            {
                if state.config.pipeline == crate::pipeline::PipelineMode::Off {
                    ", or serve with `--pipeline auto` to split it into stages that fit"
                } else {
                    ", or start workers that take pipeline stages (it is split into stages \
                     that fit when enough of them are connected)"
                }
            } else {
                ""
            };
            format!(
                "no connected worker can hold {name} in {precision} precision: its weights \
                 are {} MiB and the largest budget a worker declared is {largest} MiB \
                 (`tabula worker --max-model-mb`); start a worker with a larger budget{split}",
                why.model_mb
            )
        }
    };
    Err(ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message,
        param: Some("model"),
        code: Some("no_worker_fits"),
    })
}

/// The stages a request runs as, when it becomes a pipeline session: an exact generation of
/// one prompt, under `--pipeline` (see [`crate::pipeline::stages_for`]).
fn pipeline_stages(state: &State, p: &Prepared) -> Option<usize> {
    let ModelKind::Generation { layers, .. } = &p.model.kind else {
        return None;
    };
    if p.precision != Precision::Exact || p.tasks.len() != 1 || p.model.pieces.is_empty() {
        return None;
    }
    let budgets = state.pipelines.budgets();
    let whole_mb = p
        .model
        .model_ref(Precision::Exact)
        .files
        .iter()
        .map(|f| f.size)
        .sum::<u64>()
        .div_ceil(1 << 20);
    // Workers that take no stages declared no budget: they hold whatever they are given.
    let unit_only =
        state.metrics.workers_connected.load(Ordering::Relaxed) as usize > budgets.len();
    let whole_fits = unit_only || budgets.iter().any(|&b| b == 0 || u64::from(b) >= whole_mb);
    crate::pipeline::stages_for(
        state.config.pipeline,
        &p.model,
        *layers,
        &budgets,
        whole_fits,
        state.config.pipeline_replicas as usize,
    )
}

/// Runs a request as a pipeline session: tokens are verified step by step by two disjoint
/// pipelines, and a streaming request gets each one as soon as it is agreed.
async fn run_pipeline(
    state: &AppState,
    headers: &HeaderMap,
    api_key: &str,
    endpoint: &str,
    body: &Value,
    p: Prepared,
    stages: usize,
) -> ApiResult<Response> {
    let (task, credit) = p.tasks[0].clone();
    let who = Requester::of(headers, api_key, endpoint, body)?;
    let new = who.new_job(&p);
    let crate::scheduler::PipelineJob { job, unit, pool } = match state
        .create_pipeline_job(new, &task, credit)
        .await?
    {
        Ok(crate::scheduler::PipelineCreated::New(created)) => created,
        // A retried request: the session of its first attempt answers it.
        Ok(crate::scheduler::PipelineCreated::Existing(id)) => {
            if !state
                .wait_job(&id, Duration::from_millis(state.config.request_timeout_ms))
                .await?
            {
                if state.job_status(&id).await?.as_deref() == Some("failed") {
                    return Err(ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        kind: "server_error",
                        message: format!(
                            "job {id}, the first attempt of this request, failed; send the request again with a new Idempotency-Key"
                        ),
                        param: None,
                        code: Some("pipeline_failed"),
                    });
                }
                return Err(pending(state, &id));
            }
            let outputs = state.job_outputs(&id).await?;
            if p.stream {
                return Ok(sse(stream_events(&p, &id, outputs)?));
            }
            return Ok(Json(render(&p, &id, outputs)?).into_response());
        }
        Err(other) => return Err(refusal(other)),
    };
    let spec = crate::pipeline::SessionSpec::for_task(
        task,
        job.clone(),
        unit,
        stages,
        state.config.pipeline_replicas as usize,
        Duration::from_millis(state.config.pipeline_wait_ms),
        state.config.pipeline_direct_ms,
        pool,
    )
    .expect("a generation request has generation tasks")
    .with_assurance(p.assurance);
    let (tokens_tx, mut tokens) = tokio::sync::mpsc::unbounded_channel();
    // The session runs on its own: a client that goes away does not stop it (its job
    // finishes and is credited).
    let mut session = tokio::spawn(crate::pipeline::run_session(state.clone(), spec, tokens_tx));
    let failed = |e: String| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: format!("the pipeline session failed: {e}"),
        param: None,
        code: Some("pipeline_failed"),
    };
    if !p.stream {
        let outcome = session
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(failed)?;
        return Ok(Json(render(&p, &job, vec![outcome.output])?).into_response());
    }
    let registry = state.registry();
    let (chat, stop_texts) = match &p.render {
        Render::Chat { stop, .. } => (true, stop.clone()),
        Render::Completion { stop, .. } => (false, stop.clone()),
        Render::Embeddings { .. } => unreachable!("a generation request"),
    };
    let stop_tokens = match &p.model.kind {
        ModelKind::Generation { tokenizer, .. } => tokenizer.stop.clone(),
        ModelKind::Embedding { .. } => Vec::new(),
    };
    let (id, object) = if chat {
        (format!("chatcmpl-{job}"), "chat.completion.chunk")
    } else {
        (format!("cmpl-{job}"), "text_completion")
    };
    let name = p.model.name.clone();
    let chunk = move |text: Option<&str>, finish: Value| -> String {
        let choice = if chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null })
        };
        json!({ "id": id, "object": object, "created": now_s(), "model": name, "choices": [choice] })
            .to_string()
    };
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    if chat {
        let first = chunk(None, Value::Null).replace(
            "\"delta\":{}",
            "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}",
        );
        let _ = events_tx.send(first);
    }
    let model_name = p.model.name.clone();
    tokio::spawn(async move {
        let Some(ModelKind::Generation { tokenizer, .. }) =
            registry.find(&model_name).map(|m| &m.kind)
        else {
            return;
        };
        let mut all: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let mut done = false;
        loop {
            tokio::select! {
                token = tokens.recv(), if !done => match token {
                    Some(t) => {
                        all.push(t);
                        if stop_tokens.contains(&t) {
                            continue;
                        }
                        let Ok(mut text) = tokenizer.decode(&all) else { continue };
                        let cut = stop_texts.iter().filter_map(|s| text.find(s.as_str())).min();
                        if let Some(cut) = cut {
                            text.truncate(cut);
                        }
                        // A token that ends inside a character waits for the next one.
                        if text.len() > shown && text.is_char_boundary(shown) && !text.ends_with('\u{fffd}') {
                            let _ = events_tx.send(chunk(Some(&text[shown..]), Value::Null));
                            shown = text.len();
                        }
                        if cut.is_some() {
                            let _ = events_tx.send(chunk(None, json!("stop")));
                            let _ = events_tx.send("[DONE]".into());
                            return;
                        }
                    }
                    None => done = true,
                },
                result = &mut session => {
                    match result.map_err(|e| e.to_string()).and_then(|r| r) {
                        Ok(outcome) => {
                            // Tokens agreed just before the end are still in the channel.
                            while let Ok(t) = tokens.try_recv() {
                                all.push(t);
                            }
                            let stopped = matches!(outcome.output, UnitOutput::Generation { stopped: true, .. });
                            // An audit at the end found that the pipelines agreed on wrong
                            // tokens (colluders), after they were streamed: say so, with
                            // the verified text, instead of finishing as if all were well.
                            if let UnitOutput::Generation { tokens: verified, .. } = &outcome.output
                                && !verified.starts_with(&all)
                            {
                                let text = tokenizer.decode(verified).unwrap_or_default();
                                let _ = events_tx.send(json!({ "error": { "message": format!("the streamed text was computed wrongly by colluding stages (caught by an audit and struck); the verified text is: {text}"), "type": "server_error", "param": null, "code": "pipeline_audit_failed" } }).to_string());
                                let _ = events_tx.send("[DONE]".into());
                                return;
                            }
                            let content = if stopped { &all[..all.len().saturating_sub(1)] } else { &all[..] };
                            if let Ok(text) = tokenizer.decode(content)
                                && text.len() > shown
                                && text.is_char_boundary(shown)
                            {
                                let _ = events_tx.send(chunk(Some(&text[shown..]), Value::Null));
                            }
                            let finish = if stopped { "stop" } else { "length" };
                            let _ = events_tx.send(chunk(None, json!(finish)));
                        }
                        Err(e) => {
                            let _ = events_tx.send(json!({ "error": { "message": format!("the pipeline session failed: {e}"), "type": "server_error", "param": null, "code": "pipeline_failed" } }).to_string());
                        }
                    }
                    let _ = events_tx.send("[DONE]".into());
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv().await.map(|data| {
            (
                Ok::<_, std::convert::Infallible>(Event::default().data(data)),
                rx,
            )
        })
    });
    Ok(Sse::new(stream).into_response())
}

async fn embeddings(
    Extract(state): Extract<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    respond(&state, &headers, "/v1/embeddings", body).await
}

async fn completions(
    Extract(state): Extract<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    respond(&state, &headers, "/v1/completions", body).await
}

async fn chat_completions(
    Extract(state): Extract<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Response> {
    respond(&state, &headers, "/v1/chat/completions", body).await
}

fn prepare_embeddings(state: &State, body: &Value) -> ApiResult<Prepared> {
    let model = find_model(state, body, "embedding")?;
    let ModelKind::Embedding {
        tokenizer,
        dim,
        vocab,
    } = &model.kind
    else {
        unreachable!("checked by find_model")
    };
    let precision = precision(body)?;
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "`encoding_format` must be \"float\" or \"base64\"",
                Some("encoding_format"),
            ));
        }
    };
    if let Some(d) = body.get("dimensions").filter(|d| !d.is_null())
        && d.as_u64() != Some(*dim as u64)
    {
        return Err(ApiError::invalid(
            format!("{} produces {dim} dimensions only", model.name),
            Some("dimensions"),
        ));
    }
    let input = body
        .get("input")
        .ok_or_else(|| ApiError::invalid("`input` is required", Some("input")))?;
    let max_len = tokenizer.max_len();
    let sequences: Vec<Vec<u32>> = match input {
        Value::String(s) => {
            check_text(s, "input")?;
            vec![
                tokenizer
                    .encode(s)
                    .map_err(|e| ApiError::invalid(e.to_string(), Some("input")))?,
            ]
        }
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid(
                "`input` must not be empty",
                Some("input"),
            ));
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            if items.len() > MAX_INPUTS {
                return Err(ApiError::invalid(
                    format!("at most {MAX_INPUTS} inputs per request"),
                    Some("input"),
                ));
            }
            items
                .iter()
                .map(|s| {
                    let s = s.as_str().unwrap_or_default();
                    check_text(s, "input")?;
                    tokenizer
                        .encode(s)
                        .map_err(|e| ApiError::invalid(e.to_string(), Some("input")))
                })
                .collect::<ApiResult<_>>()?
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![token_list(input, *vocab, "input")?]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => {
            if items.len() > MAX_INPUTS {
                return Err(ApiError::invalid(
                    format!("at most {MAX_INPUTS} inputs per request"),
                    Some("input"),
                ));
            }
            items
                .iter()
                .map(|i| token_list(i, *vocab, "input"))
                .collect::<ApiResult<_>>()?
        }
        _ => {
            return Err(ApiError::invalid(
                "`input` must be a string, an array of strings, an array of token ids or an array of such arrays",
                Some("input"),
            ));
        }
    };
    if let Some(s) = sequences.iter().find(|s| s.is_empty() || s.len() > max_len) {
        return Err(ApiError::invalid(
            format!("an input of {} tokens; each needs 1 to {max_len}", s.len()),
            Some("input"),
        ));
    }
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let model_ref = model.model_ref(precision);
    let tasks: Vec<(Task, i64)> = sequences
        .chunks(state.config.unit_sequences)
        .map(|chunk| {
            let n: usize = chunk.iter().map(Vec::len).sum();
            (
                Task::Embed {
                    model: model_ref.clone(),
                    precision,
                    sequences: chunk.to_vec(),
                },
                micro(model.gflop_per_token * n as f64),
            )
        })
        .collect();
    if body
        .get("stream")
        .is_some_and(|v| v != &json!(false) && !v.is_null())
    {
        return Err(ApiError::invalid(
            "embeddings do not stream",
            Some("stream"),
        ));
    }
    Ok(Prepared {
        kind: "embd",
        model,
        precision,
        assurance: assurance(body)?,
        tasks,
        stream: false,
        render: Render::Embeddings { base64, tokens },
    })
}

fn render_embeddings(
    model: &ServedModel,
    outputs: Vec<UnitOutput>,
    base64: bool,
    tokens: usize,
) -> ApiResult<EmbeddingList> {
    let mut data = Vec::new();
    for out in outputs {
        let vectors: Vec<Vec<f32>> = match out {
            UnitOutput::ExactEmbeddings { dim, q15 } => q15
                .chunks(dim as usize)
                .map(|v| v.iter().map(|&x| (f64::from(x) / 32768.0) as f32).collect())
                .collect(),
            UnitOutput::FastEmbeddings { dim, values } => {
                values.chunks(dim as usize).map(<[f32]>::to_vec).collect()
            }
            UnitOutput::Generation { .. } => {
                return Err(crate::CoordinatorError::Corrupt(
                    "a generation in an embedding job".into(),
                )
                .into());
            }
        };
        for v in vectors {
            let embedding = if base64 {
                Embedding::Base64(
                    B64.encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
                )
            } else {
                Embedding::Floats(v)
            };
            data.push(EmbeddingItem {
                object: "embedding",
                index: data.len(),
                embedding,
            });
        }
    }
    Ok(EmbeddingList {
        object: "list",
        data,
        model: model.name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

/// Sampling settings shared by completions and chat completions.
struct Sampling {
    max_tokens: u32,
    temperature_milli: u32,
    top_p_q16: u32,
    seed: u64,
    stop: Vec<String>,
    stream: bool,
}

fn sampling(body: &Value, default_max: u32) -> ApiResult<Sampling> {
    for unsupported in [
        "logprobs",
        "echo",
        "best_of",
        "tools",
        "functions",
        "logit_bias",
    ] {
        if body
            .get(unsupported)
            .is_some_and(|v| !v.is_null() && v != &json!(false))
        {
            return Err(ApiError::invalid(
                format!("`{unsupported}` is not supported"),
                Some("model"),
            ));
        }
    }
    if body
        .get("n")
        .is_some_and(|n| !n.is_null() && n.as_u64() != Some(1))
    {
        return Err(ApiError::invalid("only `n: 1` is supported", Some("n")));
    }
    let num = |name: &'static str, default: f64, lo: f64, hi: f64| -> ApiResult<f64> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && (lo..=hi).contains(x))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("`{name}` must be a number from {lo} to {hi}"),
                        Some(name),
                    )
                }),
        }
    };
    let max_tokens = body
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("max_tokens").filter(|v| !v.is_null()));
    let max_tokens = match max_tokens {
        None => default_max,
        Some(v) => v
            .as_u64()
            .filter(|&m| (1..=u64::from(tabula_protocol::MAX_NEW_TOKENS)).contains(&m))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "`max_tokens` must be an integer from 1 to {}",
                        tabula_protocol::MAX_NEW_TOKENS
                    ),
                    Some("max_tokens"),
                )
            })? as u32,
    };
    let temperature = num("temperature", 1.0, 0.0, 2.0)?;
    let top_p = num("top_p", 1.0, 0.0, 1.0)?;
    let seed = match body.get("seed") {
        None | Some(Value::Null) => u64::from_le_bytes(crate::db::random_bytes()),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::invalid("`seed` must be an integer", Some("seed")))?,
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 && items.iter().all(Value::is_string) => {
            items
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        }
        _ => {
            return Err(ApiError::invalid(
                "`stop` must be a string or up to 4 strings",
                Some("stop"),
            ));
        }
    };
    if stop.iter().any(|s| s.is_empty() || s.len() > 200) {
        return Err(ApiError::invalid(
            "each `stop` string needs 1 to 200 bytes",
            Some("stop"),
        ));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        _ => {
            return Err(ApiError::invalid(
                "`stream` must be a boolean",
                Some("stream"),
            ));
        }
    };
    Ok(Sampling {
        max_tokens,
        temperature_milli: (temperature * 1000.0).round() as u32,
        top_p_q16: (top_p * 65536.0).round() as u32,
        seed,
        stop,
        stream,
    })
}

/// One finished generation: text (cut at a stop string), finish reason, token count.
struct Choice {
    text: String,
    finish: &'static str,
    completion_tokens: usize,
}

fn choices(
    model: &ServedModel,
    outputs: Vec<UnitOutput>,
    stop: &[String],
) -> ApiResult<Vec<Choice>> {
    let ModelKind::Generation { tokenizer, .. } = &model.kind else {
        unreachable!("generation model")
    };
    outputs
        .into_iter()
        .map(|out| {
            let UnitOutput::Generation {
                tokens, stopped, ..
            } = out
            else {
                return Err(crate::CoordinatorError::Corrupt("not a generation".into()).into());
            };
            let n = tokens.len();
            let content = if stopped {
                &tokens[..n - 1]
            } else {
                &tokens[..]
            };
            let mut text = tokenizer
                .decode(content)
                .map_err(crate::CoordinatorError::from)?;
            let mut finish = if stopped { "stop" } else { "length" };
            if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                finish = "stop";
            }
            Ok(Choice {
                text,
                finish,
                completion_tokens: n,
            })
        })
        .collect()
}

fn generation_tasks(
    model: &ServedModel,
    precision: Precision,
    prompts: &[Vec<u32>],
    s: &Sampling,
) -> ApiResult<Vec<(Task, i64)>> {
    let ModelKind::Generation {
        tokenizer, context, ..
    } = &model.kind
    else {
        unreachable!("generation model")
    };
    prompts
        .iter()
        .map(|p| {
            if p.is_empty() {
                return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
            }
            if p.len() + s.max_tokens as usize > *context
                || p.len() > tabula_protocol::MAX_SEQUENCE_TOKENS * 4
            {
                return Err(ApiError::invalid(
                    format!(
                        "{} prompt tokens + max_tokens {} exceed the context of {context}",
                        p.len(),
                        s.max_tokens
                    ),
                    Some("max_tokens"),
                ));
            }
            Ok((
                Task::Generate {
                    model: model.model_ref(precision),
                    precision,
                    prompt: p.clone(),
                    max_tokens: s.max_tokens,
                    temperature_milli: s.temperature_milli,
                    top_p_q16: s.top_p_q16,
                    seed: s.seed,
                    stop: tokenizer.stop.clone(),
                },
                micro(model.gflop_per_token * (p.len() + s.max_tokens as usize) as f64),
            ))
        })
        .collect()
}

fn now_s() -> i64 {
    crate::db::now_ms() / 1000
}

fn prepare_completion(state: &State, body: &Value) -> ApiResult<Prepared> {
    let model = find_model(state, body, "generation")?;
    let ModelKind::Generation {
        tokenizer, vocab, ..
    } = &model.kind
    else {
        unreachable!()
    };
    let precision = precision(body)?;
    let s = sampling(body, 16)?;
    let prompt = body
        .get("prompt")
        .ok_or_else(|| ApiError::invalid("`prompt` is required", Some("prompt")))?;
    let encode = |t: &str| -> ApiResult<Vec<u32>> {
        check_text(t, "prompt")?;
        tokenizer
            .encode(t)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
    };
    let prompts: Vec<Vec<u32>> = match prompt {
        Value::String(t) => vec![encode(t)?],
        Value::Array(items)
            if !items.is_empty()
                && items.len() <= MAX_PROMPTS
                && items.iter().all(Value::is_string) =>
        {
            items
                .iter()
                .map(|t| encode(t.as_str().unwrap_or_default()))
                .collect::<ApiResult<_>>()?
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![token_list(prompt, *vocab, "prompt")?]
        }
        Value::Array(items)
            if !items.is_empty()
                && items.len() <= MAX_PROMPTS
                && items.iter().all(Value::is_array) =>
        {
            items
                .iter()
                .map(|i| token_list(i, *vocab, "prompt"))
                .collect::<ApiResult<_>>()?
        }
        _ => {
            return Err(ApiError::invalid(
                format!("`prompt` must be a string, up to {MAX_PROMPTS} strings, or token ids"),
                Some("prompt"),
            ));
        }
    };
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let tasks = generation_tasks(&model, precision, &prompts, &s)?;
    Ok(Prepared {
        kind: "cmpl",
        model,
        precision,
        assurance: assurance(body)?,
        tasks,
        stream: s.stream,
        render: Render::Completion {
            stop: s.stop,
            prompt_tokens,
        },
    })
}

/// Server-sent events of `events`, then `[DONE]`, as OpenAI streams. The result is verified
/// before the first event: a stream never shows text that could still be rejected.
fn sse(events: Vec<Value>) -> Response {
    let items: Vec<Result<Event, std::convert::Infallible>> = events
        .into_iter()
        .map(|e| Ok(Event::default().data(e.to_string())))
        .chain(std::iter::once(Ok(Event::default().data("[DONE]"))))
        .collect();
    Sse::new(futures_util::stream::iter(items)).into_response()
}

fn prepare_chat(state: &State, body: &Value) -> ApiResult<Prepared> {
    let model = find_model(state, body, "generation")?;
    let ModelKind::Generation { tokenizer, .. } = &model.kind else {
        unreachable!()
    };
    let precision = precision(body)?;
    let s = sampling(body, 256)?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty() && m.len() <= 256)
        .ok_or_else(|| {
            ApiError::invalid(
                "`messages` must be an array of 1 to 256 messages",
                Some("messages"),
            )
        })?;
    let mut turns: Vec<(String, String)> = Vec::new();
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .filter(|r| ["system", "user", "assistant", "developer"].contains(r));
        let content = match m.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    (p.get("type").and_then(Value::as_str) == Some("text"))
                        .then(|| p.get("text").and_then(Value::as_str))
                        .flatten()
                })
                .collect::<Option<Vec<_>>>()
                .map(|t| t.concat()),
            _ => None,
        };
        let (Some(role), Some(content)) = (role, content) else {
            return Err(ApiError::invalid(
                "each message needs a `role` (system, user, assistant) and a text `content`",
                Some("messages"),
            ));
        };
        check_text(&content, "messages")?;
        turns.push((
            if role == "developer" { "system" } else { role }.to_string(),
            content,
        ));
    }
    let pairs: Vec<(&str, &str)> = turns
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    let prompt = tokenizer
        .chat_prompt_messages(&pairs)
        .and_then(|p| tokenizer.encode(&p))
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let prompt_tokens = prompt.len();
    let tasks = generation_tasks(&model, precision, &[prompt], &s)?;
    Ok(Prepared {
        kind: "chat",
        model,
        precision,
        assurance: assurance(body)?,
        tasks,
        stream: s.stream,
        render: Render::Chat {
            stop: s.stop,
            prompt_tokens,
        },
    })
}

/// The caller's 100 most recent jobs with their progress (for the requester page); other
/// keys' jobs are not listed.
async fn list_jobs(
    Extract(state): Extract<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let api_key = authorize(&state, &headers).await?;
    Ok(Json(json!({
        "object": "list",
        "data": state.recent_jobs(&owner_of(&api_key), 100).await?,
    })))
}

async fn ledger_list(Extract(state): Extract<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(state.ledger_list().await?))
}

async fn ledger(
    Extract(state): Extract<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    match state.ledger(&id).await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::not_found(
            "no worker key (64 hex digits) or payout address (0x + 40 hex digits) with that id in the ledger",
        )),
    }
}

/// A payout address from a path: `0x` and 40 hex digits.
fn payout_address(text: &str) -> ApiResult<tabula_chain::Address> {
    tabula_chain::parse_address(text).ok_or_else(|| {
        ApiError::invalid(
            "a payout address is 0x followed by 40 hex digits (an EVM address)",
            Some("address"),
        )
    })
}

/// Micro-credits as JSON: a decimal string (exact, for the contract) and a number of credits.
fn amount_json(micro: tabula_chain::U256) -> (String, f64) {
    let credits = micro.to_string().parse::<f64>().unwrap_or(f64::MAX) / 1e6;
    (micro.to_string(), credits)
}

/// The on-chain side of an address: what it claimed and holds.
async fn on_chain(state: &State, account: tabula_chain::Address) -> ApiResult<Value> {
    let chain = &state.settlement.chain;
    let claimed = chain
        .claimed(account)
        .await
        .map_err(crate::CoordinatorError::from)?;
    let balance = chain
        .balance_of(account)
        .await
        .map_err(crate::CoordinatorError::from)?;
    Ok(json!({
        "chain": chain.describe(),
        "contract": chain.contract_address().to_string(),
        "claimed_micro": claimed.to_string(),
        "balance_micro": balance.to_string(),
        "balance": amount_json(balance).1,
    }))
}

async fn ledger_proof(
    Extract(state): Extract<AppState>,
    Path(address): Path<String>,
) -> ApiResult<Json<Value>> {
    let account = payout_address(&address)?;
    let Some(proof) = state.settlement.proof(&state.db, account).await? else {
        let latest = state.settlement.latest_epoch_number(&state.db).await?;
        return Err(ApiError::not_found(match latest {
            None => "no epoch has been posted yet: credit of addresses linked by workers goes on-chain at the next epoch".to_string(),
            Some(e) => format!(
                "{address} has no credit in epoch {e}, the latest posted: link it from a worker (it then settles at the next epoch)"
            ),
        }));
    };
    let (micro, credits) = amount_json(proof.cumulative_micro);
    Ok(Json(json!({
        "object": "ledger.proof",
        "address": address.to_ascii_lowercase(),
        "epoch": proof.epoch,
        "root": proof.root.to_string(),
        "cumulative_amount": micro,
        "cumulative_credit": credits,
        "proof": proof.proof.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "contract": state.settlement.chain.contract_address().to_string(),
        "on_chain": on_chain(&state, account).await?,
    })))
}

/// Relays a claim: the coordinator pays the gas, the tokens go to the address. At most one
/// transaction per address and epoch (nothing is sent when everything is claimed already).
async fn ledger_claim(
    Extract(state): Extract<AppState>,
    Path(address): Path<String>,
) -> ApiResult<Json<Value>> {
    use crate::settlement::ClaimOutcome;
    let account = payout_address(&address)?;
    let outcome = state.settlement.claim(&state.db, account).await?;
    let (proof, claimed_now, tx) = match outcome {
        ClaimOutcome::NotInLedger => {
            return Err(ApiError::not_found(format!(
                "{address} has no settled credit yet: it appears after the next epoch is posted"
            )));
        }
        ClaimOutcome::Busy => {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                message: format!(
                    "a claim for {address} (or too many claims) is being mined now; retry in a few seconds"
                ),
                param: None,
                code: Some("claim_in_progress"),
            });
        }
        ClaimOutcome::AlreadyClaimed { proof, .. } => (proof, None, None),
        ClaimOutcome::Claimed { proof, amount, tx } => (proof, Some(amount), Some(tx)),
    };
    Ok(Json(json!({
        "object": "ledger.claim",
        "address": address.to_ascii_lowercase(),
        "epoch": proof.epoch,
        "cumulative_amount": proof.cumulative_micro.to_string(),
        "claimed_now": claimed_now.map(|a| a.to_string()),
        "transaction": tx.as_ref().map(|t| t.tx_hash.to_string()),
        "gas_used": tx.as_ref().map(|t| t.gas_used),
        "on_chain": on_chain(&state, account).await?,
    })))
}

/// A posted epoch with every (address, cumulative amount): anyone can rebuild its root with
/// `@openzeppelin/merkle-tree` and compare it with the contract's.
async fn ledger_epoch(
    Extract(state): Extract<AppState>,
    Path(epoch): Path<String>,
) -> ApiResult<Json<Value>> {
    let number = if epoch == "latest" {
        state.settlement.latest_epoch_number(&state.db).await?
    } else {
        Some(
            epoch
                .parse::<u64>()
                .ok()
                .filter(|e| *e > 0 && *e < i64::MAX as u64)
                .ok_or_else(|| {
                    ApiError::invalid("an epoch is a positive integer or `latest`", Some("epoch"))
                })?,
        )
    };
    let listing = match number {
        Some(n) => state.settlement.epoch_listing(&state.db, n).await?,
        None => None,
    };
    let Some(listing) = listing else {
        return Err(ApiError::not_found(if epoch == "latest" {
            "no epoch has been posted yet".to_string()
        } else {
            format!("epoch {epoch} has not been posted")
        }));
    };
    Ok(Json(json!({
        "object": "ledger.epoch",
        "epoch": listing.epoch,
        "root": listing.root.to_string(),
        "total_micro": listing.total_micro.to_string(),
        "contributors": listing.entries.len(),
        "transaction": listing.tx_hash,
        "posted_ms": listing.posted_ms,
        "contract": state.settlement.chain.contract_address().to_string(),
        "chain": state.settlement.chain.describe(),
        "leaf_encoding": ["address", "uint256"],
        "entries": listing.entries.iter().map(|e| [e.account.to_string().to_ascii_lowercase(), e.amount.to_string()]).collect::<Vec<_>>(),
    })))
}

async fn weights(
    Extract(state): Extract<AppState>,
    Path(sha): Path<String>,
) -> ApiResult<Response> {
    let hash = Hash::from_hex(&sha).map_err(|_| {
        ApiError::invalid("weights are named by their SHA-256 (64 hex digits)", None)
    })?;
    let registry = state.registry();
    let path = registry
        .path(&hash)
        .ok_or_else(|| ApiError::not_found("no weights file with that hash"))?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| crate::CoordinatorError::Config(e.to_string()))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| crate::CoordinatorError::Config(e.to_string()))?
        .len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CACHE_CONTROL,
                "public, max-age=31536000, immutable".to_string(),
            ),
            (header::ETAG, format!("\"{sha}\"")),
        ],
        body,
    )
        .into_response())
}

async fn worker_socket(
    Extract(state): Extract<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let addr = crate::net::client_address(peer, forwarded, &state.config.trusted_proxies);
    upgrade
        .max_message_size(tabula_protocol::MAX_WORKER_FRAME)
        .max_frame_size(tabula_protocol::MAX_WORKER_FRAME)
        .read_buffer_size(tabula_protocol::SOCKET_READ_BUFFER)
        .on_upgrade(move |socket| crate::ws::session(socket, addr, state))
}

async fn openapi() -> Json<Value> {
    let op = |summary: &str, auth: bool| {
        let mut o = json!({ "summary": summary, "responses": {
            "200": { "description": "OK" },
            "4XX": { "description": "OpenAI-shaped error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } } } });
        if auth {
            o["security"] = json!([{ "bearer": [] }]);
        }
        o
    };
    let body_op = |summary: &str, schema: &str| {
        let mut o = op(summary, true);
        o["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
        o
    };
    Json(json!({
        "openapi": "3.1.0",
        "info": { "title": "Tabula coordinator", "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible inference verified by redundant execution on volunteer workers." },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object",
                    "properties": { "message": { "type": "string" }, "type": { "type": "string" }, "param": { "type": ["string", "null"] }, "code": { "type": ["string", "null"] } } } } },
                "EmbeddingRequest": { "type": "object", "required": ["model", "input"], "properties": {
                    "model": { "type": "string" },
                    "input": { "oneOf": [ { "type": "string" }, { "type": "array", "items": { "type": "string" } },
                        { "type": "array", "items": { "type": "integer" } }, { "type": "array", "items": { "type": "array", "items": { "type": "integer" } } } ] },
                    "encoding_format": { "enum": ["float", "base64"] },
                    "precision": { "enum": ["exact", "fast"] }, "assurance": { "enum": ["standard", "high", "referee"] } } },
                "CompletionRequest": { "type": "object", "required": ["model", "prompt"], "properties": {
                    "model": { "type": "string" }, "prompt": {}, "max_tokens": { "type": "integer" }, "temperature": { "type": "number" },
                    "top_p": { "type": "number" }, "seed": { "type": "integer" }, "stop": {}, "stream": { "type": "boolean" },
                    "precision": { "enum": ["exact", "fast"] }, "assurance": { "enum": ["standard", "high", "referee"] } } },
                "ChatCompletionRequest": { "type": "object", "required": ["model", "messages"], "properties": {
                    "model": { "type": "string" }, "messages": { "type": "array", "items": { "type": "object" } }, "max_tokens": { "type": "integer" },
                    "temperature": { "type": "number" }, "top_p": { "type": "number" }, "seed": { "type": "integer" }, "stop": {},
                    "stream": { "type": "boolean" }, "precision": { "enum": ["exact", "fast"] }, "assurance": { "enum": ["standard", "high", "referee"] } } }
            }
        },
        "paths": {
            "/v1/models": { "get": op("List the served models", false) },
            "/v1/embeddings": { "post": body_op("Sentence embeddings, verified", "EmbeddingRequest") },
            "/v1/completions": { "post": body_op("Text completion, verified", "CompletionRequest") },
            "/v1/chat/completions": { "post": body_op("Chat completion, verified", "ChatCompletionRequest") },
            "/v1/files": { "post": op("Upload a JSONL batch input file (multipart: purpose=batch, file)", true) },
            "/v1/files/{id}": { "get": op("A file's metadata", true) },
            "/v1/files/{id}/content": { "get": op("A file's content (batch output files too)", true) },
            "/v1/batches": { "post": op("Start a batch over an uploaded file", true) },
            "/v1/batches/{id}": { "get": op("A batch's status, counts and output file", true) },
            "/v1/jobs": { "get": op("The 100 most recent jobs and their progress", true) },
            "/v1/ledger": { "get": op("Every worker and its verified credit", false) },
            "/v1/ledger/{id}": { "get": op("Credit, receipts and record of a worker key or payout address", false) },
            "/v1/ledger/proof/{address}": { "get": op("A payout address's cumulative credit in the latest posted epoch, its Merkle proof, the contract, and its on-chain balance", false) },
            "/v1/ledger/claim/{address}": { "post": op("Relay a claim: the coordinator pays the gas, the credit token goes to the address", false) },
            "/v1/ledger/epochs/{epoch}": { "get": op("A posted epoch (a number or `latest`): root, transaction and every (address, cumulative amount)", false) },
            "/v1/weights/{sha256}": { "get": op("A content-addressed model file", false) },
            "/v1/models/{model}/pieces": { "get": op("A generation model's exact file as per-layer pieces", false) },
            "/v1/worker": { "get": op("The worker WebSocket (binary frames, see crates/protocol)", false) },
            "/healthz": { "get": op("Liveness and database check", false) },
            "/metrics": { "get": op("Prometheus metrics", false) }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_embeddings_print_as_the_value_tree_did() {
        let v = vec![0.1f32, -1.5e-7, 3.0, f32::MIN_POSITIVE, 0.333_333_34];
        let typed = serde_json::to_string(&Embedding::Floats(v.clone())).unwrap();
        assert_eq!(typed, json!(v).to_string());
        assert!(typed.starts_with("[0.10000000149011612,"), "{typed}");
    }
}
