//! `/healthz`, `/readyz` and `/metrics` for Kubernetes probes and Prometheus.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Readiness;

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        // Alive as long as the process serves requests.
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(r): State<Readiness>| async move {
                if r.get() {
                    (StatusCode::OK, "ready\n".to_string())
                } else {
                    // The reasons name a sink, a table or the registry, never a row value.
                    let why = r.reasons().join("; ");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::telemetry::render(),
                )
            }),
        )
        .with_state(readiness)
}

/// Serves until `shutdown` fires. Binding errors are returned so a bad address fails start-up.
pub async fn serve(
    listen: &str,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "http server listening (/healthz /readyz /metrics)");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router(readiness))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}
