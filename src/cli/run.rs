//! `refund-worker run`: load the configuration, set up telemetry, build
//! the service and run it until a signal asks it to stop (a second signal
//! exits at once).

use refund_worker::config::{LogFormat, Settings};
use refund_worker::observability::telemetry;
use refund_worker::service::app::App;
use refund_worker::service::shutdown;

pub(crate) async fn run(settings: Settings, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let otlp = settings
        .telemetry
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| telemetry::Otlp {
            endpoint,
            ca: settings.telemetry.otlp_tls_ca_path.as_deref(),
        });
    let telemetry = telemetry::init_with(
        log_format.unwrap_or(settings.log.format),
        &settings.log.filter,
        otlp,
    )
    .map_err(anyhow::Error::msg)?;
    let app = App::build(settings)
        .await
        .map_err(exit_2_for_configuration)?;
    let (trigger, listener) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down (a second signal exits at once)");
        trigger.fire();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    // On a worker thread, not on `block_on`'s: the consumer loop hands out
    // every delivery and reaps every finished one, and on the main thread
    // each of those is a thread wake-up (two per refund, measured).
    let result = tokio::spawn(app.run(listener)).await?;
    // Export the spans still buffered (off the async runtime: the exporter
    // blocks on requests that run on it).
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result.map_err(exit_2_for_configuration)?;
    Ok(())
}

/// A store or broker that cannot work with this configuration is a
/// configuration error: status 2, like a wrong setting.
fn exit_2_for_configuration(error: refund_worker::service::app::AppError) -> anyhow::Error {
    match error {
        refund_worker::service::app::AppError::StoreConfig(message) => {
            anyhow::Error::new(refund_worker::config::ConfigError::Deployment(message))
        }
        other => other.into(),
    }
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
