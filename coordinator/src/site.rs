//! The static site under `/`: the volunteer page, its Web Worker and wasm package, the
//! requester page and the browser extension's files, read from the `www/` directory
//! ([`crate::Config::www_dir`]). Only plain files inside that directory are served; anything
//! else falls through to the API's JSON 404.

use std::path::{Component, Path, PathBuf};

use axum::{
    extract::State as Extract,
    http::{HeaderValue, Method, StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
};

use crate::api::{ApiError, AppState};

/// The largest file served (the wasm package is a few MB).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Where the site is when `--www` is not given: `./www` when it holds the page, else the
/// `www/` of the source tree a development binary was built in.
pub fn default_www_dir() -> Option<PathBuf> {
    let candidates = [
        Some(PathBuf::from("www")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../www")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("index.html").is_file())
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `uri`'s path as a file under `root`, or `None` if it tries to leave it.
fn resolve(root: &Path, uri: &Uri) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    let rel = uri.path().trim_start_matches('/');
    for part in Path::new(rel).components() {
        match part {
            Component::Normal(p) => path.push(p),
            _ => return None,
        }
    }
    if rel.is_empty() || rel.ends_with('/') {
        path.push("index.html");
    }
    Some(path)
}

/// The router's fallback: a file of the site for a GET, else the API's not-found error.
pub async fn fallback(Extract(state): Extract<AppState>, method: Method, uri: Uri) -> Response {
    let not_found = || ApiError::not_found("no such endpoint; see /openapi.json").into_response();
    if method != Method::GET && method != Method::HEAD {
        return not_found();
    }
    // A file inside the site, or for `/` without one, a note on how to install the page.
    let file = state
        .config
        .www_dir
        .as_deref()
        .and_then(|root| resolve(root, &uri));
    let is_file = match &file {
        Some(path) => tokio::fs::metadata(path)
            .await
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE_BYTES),
        None => false,
    };
    let path = match file {
        Some(path) if is_file => path,
        _ if uri.path() == "/" => return Html(NO_SITE).into_response(),
        _ => return not_found(),
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mut response = (StatusCode::OK, bytes).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&path)),
            );
            // The page and its worker change with each build; the browser revalidates.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read a site file: {e}");
            not_found()
        }
    }
}

const NO_SITE: &str = "<!doctype html><meta charset=utf-8><title>Tabula coordinator</title>\
<h1>Tabula coordinator</h1><p>The API is up (<a href=/openapi.json>/openapi.json</a>). \
The volunteer page is not installed here: build it with <code>npm run build</code> in the \
source tree and start <code>tabula serve --www path/to/www</code>.</p>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_site() {
        let root = Path::new("/srv/www");
        let at = |p: &str| resolve(root, &p.parse::<Uri>().unwrap());
        assert_eq!(at("/"), Some(PathBuf::from("/srv/www/index.html")));
        assert_eq!(
            at("/pkg/x.wasm"),
            Some(PathBuf::from("/srv/www/pkg/x.wasm"))
        );
        assert_eq!(
            at("/extension/"),
            Some(PathBuf::from("/srv/www/extension/index.html"))
        );
        assert_eq!(at("/../etc/passwd"), None);
        assert_eq!(at("/pkg/../../x"), None);
        assert_eq!(at("/%2e%2e/x").map(|p| p.starts_with(root)), Some(true));
    }
}
