//! Cluster mode: a request that changes a refund runs on the replica that
//! owns the refund's partition (see `cluster/forward.rs`). This layer sits
//! behind the authentication of each route: a request this replica may not
//! run is forwarded, and the owner's answer is returned as is.

use super::{error, AppState};
use crate::cluster::forward::{ForwardedRequest, ForwardedResponse};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

/// Set on a request that an other replica forwarded here; `signed` when
/// its HMAC checked out (operator authentication already happened there).
#[derive(Debug, Clone, Copy)]
pub(super) struct Forwarded {
    pub(super) signed: bool,
}

/// Largest forwarded body.
const MAX_BODY: usize = 1 << 20;

/// The refund a state-changing path is about, if it is one.
fn refund_of(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let id = match parts.as_slice() {
        ["refunds", id, "resolve" | "abandon" | "release" | "amend"] => id,
        ["callbacks", "paynet", id, _] => id,
        ["console", "resolve", id] => id,
        _ => return None,
    };
    // As axum's `Path` decodes it, so both sides compute one partition.
    Some(
        percent_encoding::percent_decode_str(id)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The layer: run here when this replica owns the refund (or the request
/// was forwarded here), forward it otherwise.
pub(super) async fn owner_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let (Some(forwarder), Some(journal)) = (&state.forwarder, state.worker.store().journal())
    else {
        return next.run(request).await;
    };
    if request.extensions().get::<Forwarded>().is_some() {
        return next.run(request).await;
    }
    let Some(refund_id) = refund_of(request.uri().path()) else {
        return next.run(request).await;
    };
    if journal.holds(journal.partition_of(&refund_id)) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    };
    let forwarded = ForwardedRequest {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.to_vec(),
    };
    match forwarder.forward(&refund_id, &forwarded).await {
        Ok(answer) => into_response(answer),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e}; try again")),
    }
}

fn into_response(answer: ForwardedResponse) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    if let Some(value) = answer
        .content_type
        .and_then(|v| header::HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    if let Some(value) = answer
        .location
        .and_then(|v| header::HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Runs a forwarded request through `app` (every route of this replica).
pub(super) async fn run(app: Router, request: ForwardedRequest, signed: bool) -> ForwardedResponse {
    let mut builder = axum::http::Request::builder()
        .method(request.method.as_str())
        .uri(request.uri.as_str());
    if let Some(content_type) = &request.content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    let Ok(mut http_request) = builder.body(Body::from(request.body)) else {
        return ForwardedResponse {
            status: 400,
            content_type: None,
            location: None,
            body: b"unreadable forwarded request".to_vec(),
        };
    };
    http_request.extensions_mut().insert(Forwarded { signed });
    let response = match app.oneshot(http_request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let header_of = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let status = parts.status.as_u16();
    let content_type = header_of(header::CONTENT_TYPE);
    let location = header_of(header::LOCATION);
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    ForwardedResponse {
        status,
        content_type,
        location,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changing_paths_name_their_refund() {
        assert_eq!(refund_of("/refunds/r-1/resolve").as_deref(), Some("r-1"));
        assert_eq!(refund_of("/refunds/a%2Fb/abandon").as_deref(), Some("a/b"));
        assert_eq!(
            refund_of("/callbacks/paynet/r-2/tok").as_deref(),
            Some("r-2")
        );
        assert_eq!(refund_of("/console/resolve/r-3").as_deref(), Some("r-3"));
        assert_eq!(refund_of("/refunds/r-1"), None);
        assert_eq!(refund_of("/refunds"), None);
        assert_eq!(refund_of("/refunds/100%/resolve").as_deref(), Some("100%"));
    }
}
