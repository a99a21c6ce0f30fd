//! Leader routing: run on the leader, forward to it, or redirect.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::BODY_LIMIT;
use crate::node::Node;
use crate::sm::ErrorCode;

const HOPS_HEADER: &str = "x-concord-hops";
const MAX_HOPS: u32 = 3;
/// Forwarded requests may block (lock waits up to an hour are allowed).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3700);

/// Reads that ask for `consistency=stale` are served locally; everything else on the routes
/// behind this middleware needs the leader.
pub async fn route_to_leader(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let query = req.uri().query().unwrap_or("");
    let is_get = req.method() == Method::GET;
    // `--unsafe-stale-reads` (a deliberately broken debugging mode): every read is local.
    if is_get && (node.unsafe_stale_reads || query.split('&').any(|p| p == "consistency=stale")) {
        return next.run(req).await;
    }
    let redirect = query.split('&').any(|p| p == "redirect=true");
    if !redirect && runs_on_any_node(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let leader = match node.wait_for_leader().await {
        Some(l) => l,
        None => {
            return ApiError::new(ErrorCode::NoLeader, "no leader is elected; retry")
                .into_response()
        }
    };
    if leader == node.id {
        return next.run(req).await;
    }
    if node.faults.is_blocked(leader) {
        return ApiError::new(
            ErrorCode::Unavailable,
            format!("leader {leader} is unreachable (link cut)"),
        )
        .into_response();
    }
    let Some(addr) = node.node_addr(leader) else {
        return ApiError::new(
            ErrorCode::NoLeader,
            format!("leader {leader} has no known address"),
        )
        .into_response();
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    if redirect {
        let location = format!("http://{addr}{path}");
        let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert("location", v);
        }
        return resp;
    }
    forward(&node, req, &addr, &path).await
}

/// Writes whose handler only proposes run on whichever node received them: `Node::propose`
/// sends the command to the leader in a batch, which costs the leader far less than an HTTP
/// request per write. A lock or semaphore acquire that queued then waits until this node
/// applied its entry and watches its state for the grant. The other writes, and linearizable
/// reads, are forwarded whole.
fn runs_on_any_node(method: &Method, path: &str) -> bool {
    if ![Method::POST, Method::PUT, Method::DELETE].contains(method) {
        return false;
    }
    let lock_call = |p: &str| {
        p.strip_prefix("/v1/locks/")
            .is_some_and(|rest| rest.ends_with("/acquire") || rest.ends_with("/release"))
    };
    ["/v1/kv/", "/v1/leases", "/v1/semaphores/"]
        .iter()
        .any(|p| path.starts_with(p))
        || lock_call(path)
}

async fn forward(node: &Node, req: Request, addr: &str, path: &str) -> Response {
    let hops: u32 = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if hops >= MAX_HOPS {
        return ApiError::new(
            ErrorCode::Unavailable,
            "forwarding hop limit reached; retry",
        )
        .into_response();
    }
    let method = req.method().clone();
    let content_type = req.headers().get("content-type").cloned();
    let body = match axum::body::to_bytes(req.into_body(), BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body is larger than 1 MiB",
            )
            .into_response()
        }
    };
    let mut out = node
        .http
        .request(method, format!("http://{addr}{path}"))
        .header(HOPS_HEADER, (hops + 1).to_string())
        .timeout(FORWARD_TIMEOUT)
        .body(body);
    if let Some(ct) = content_type {
        out = out.header("content-type", ct);
    }
    match out.send().await {
        Ok(resp) => {
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut r = Response::new(Body::from(bytes));
            *r.status_mut() = status;
            for name in [
                "content-type",
                "retry-after",
                "x-concord-leader",
                "x-concord-index",
                "location",
            ] {
                if let Some(v) = headers.get(name) {
                    r.headers_mut().insert(name, v.clone());
                }
            }
            r
        }
        // The outcome is unknown to us: the client must retry (with its request_id).
        Err(e) => ApiError::new(
            ErrorCode::Unavailable,
            format!("forwarding to leader failed: {e}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listed_writes_run_on_any_node() {
        let any = |m: Method, p: &str| runs_on_any_node(&m, p);
        assert!(any(Method::PUT, "/v1/kv/a/b"));
        assert!(any(Method::DELETE, "/v1/kv/a"));
        assert!(any(Method::POST, "/v1/leases"));
        assert!(any(Method::POST, "/v1/leases/7/keepalive"));
        assert!(any(Method::DELETE, "/v1/leases/7"));
        assert!(any(Method::POST, "/v1/locks/l/acquire"));
        assert!(any(Method::POST, "/v1/locks/l/release"));
        assert!(any(Method::POST, "/v1/semaphores/s/acquire"));
        // Reads need the leader's read index, whatever their method.
        assert!(!any(Method::GET, "/v1/kv/a"));
        assert!(!any(Method::HEAD, "/v1/kv/a"));
        assert!(!any(Method::HEAD, "/v1/leases/7"));
        // Writes whose handler needs more than a proposal.
        assert!(!any(Method::POST, "/v1/fence/check"));
        assert!(!any(Method::POST, "/v1/cluster/members"));
        assert!(!any(Method::POST, "/v1/barriers/b/wait"));
        assert!(!any(Method::POST, "/v1/locks/l/wait"));
    }
}
