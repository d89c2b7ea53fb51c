//! Saga coordinators in a local run. On NATS each Saga's coordinators run as plain processes
//! (see [`super::Running::start_sagas`]); on Redis or RabbitMQ each runs as a Microservice of
//! its own, `<saga>-saga`, whose sidecar consumes the trigger Queue and publishes outcomes,
//! its log on a nats-server beside the broker (JetStream).

use super::plan::{LOCAL_COMMAND, LocalService, local_messaging};
use crate::manifest::{Loaded, Object};
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use weir_crds::Microservice;

/// A coordinator replica's name from its service's: `place-order-saga-1` → `place-order-1`.
pub(super) fn replica_name(saga: &str, service: &LocalService) -> String {
    match service.name.strip_prefix(&service.microservice) {
        Some(suffix) if !suffix.is_empty() => format!("{saga}{suffix}"),
        _ => saga.to_string(),
    }
}

/// A Saga's coordinator as `weir up` runs it: its config, rendered as the operator would and
/// calling each step's Microservice at its local sidecar, and how many replicas run it.
pub(super) struct SagaPlan {
    pub(super) name: String,
    /// `file: Saga/name`, for errors.
    pub(super) obj: String,
    pub(super) replicas: usize,
    pub(super) config: weir_crds::coordinator::CoordinatorConfig,
}

/// The coordinator of each Saga in `loaded`. Steps call a Microservice at its replica 0's
/// sidecar, as every dependant does (one upstream per target).
pub(super) fn coordinator_configs(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: &str,
    services: &[LocalService],
) -> Result<Vec<SagaPlan>> {
    let (queues, brokers) = local_messaging(loaded, broker_url)?;
    let queues: BTreeMap<String, weir_crds::QueueSpec> =
        queues.into_iter().map(|(k, v)| (k, v.spec)).collect();
    let inbound: BTreeMap<&str, u16> = services
        .iter()
        .filter(|s| s.replica == 0)
        .map(|s| (s.microservice.as_str(), s.ports.inbound))
        .collect();
    let render_opts = crate::render::RenderOptions {
        default_namespace: namespace.to_string(),
        mesh: None,
        ..Default::default()
    };
    let mut out = Vec::new();
    for l in loaded {
        let Object::Saga(saga) = &l.object else {
            continue;
        };
        let name = saga.metadata.name.clone().unwrap_or_default();
        let obj = format!("{}: Saga/{name}", l.file.display());
        let rendered = crate::render::saga::render(saga, &queues, &brokers, &render_opts)
            .map_err(|e| anyhow!("{obj}: {e}"))?;
        let config = rendered
            .direct_config(&|m| inbound.get(m).map(|p| format!("http://127.0.0.1:{p}")))
            .map_err(|e| anyhow!("{obj}: {e}"))?;
        let replicas = usize::try_from(saga.spec.replicas).unwrap_or(0);
        if replicas == 0 {
            eprintln!("note: {obj}: replicas: 0; no coordinator runs (as in a cluster)");
        }
        out.push(SagaPlan {
            name,
            obj,
            replicas,
            config,
        });
    }
    Ok(out)
}

/// Name suffix of the service that runs a saga's coordinator beside its own sidecar.
pub(super) const COORDINATOR_SUFFIX: &str = "-saga";

/// One Microservice per Saga, `<saga>-saga`, running `weir saga-coordinator`: its sidecar
/// consumes the trigger Queue into the coordinator's HTTP trigger (`ce-id` makes the instance
/// id, so a redelivered event starts nothing new) and publishes the outcome events.
pub(super) fn coordinator_services(loaded: &[Loaded], namespace: &str) -> Result<Vec<Loaded>> {
    let weir = std::env::current_exe()?;
    let mut out = Vec::new();
    for l in loaded {
        let Object::Saga(saga) = &l.object else {
            continue;
        };
        let name = saga.metadata.name.clone().unwrap_or_default();
        let spec = &saga.spec;
        let consumes: Vec<_> = spec
            .trigger
            .queue
            .iter()
            .map(|q| serde_json::json!({"queue": q, "path": format!("/v1/sagas/{name}")}))
            .collect();
        let mut publishes: Vec<String> = [&spec.on_completed, &spec.on_failed]
            .into_iter()
            .flatten()
            .map(|o| o.queue.clone())
            .collect();
        publishes.dedup();
        let publishes: Vec<_> = publishes
            .iter()
            .map(|q| serde_json::json!({"queue": q}))
            .collect();
        let command = format!(
            "{} saga-coordinator --saga \"$WEIR_SAGA\" --config \"$WEIR_SAGA_CONFIG\"",
            weir.display()
        );
        let ms: Microservice = serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
            "metadata": {"name": format!("{name}{COORDINATOR_SUFFIX}"),
                         "annotations": {LOCAL_COMMAND: command}},
            // `WEIR_SAGA_CONFIG` differs by replica: see [`write_coordinator_configs`].
            "spec": {"image": "weir", "consumes": consumes, "publishes": publishes,
                     "replicas": spec.replicas,
                     "env": [{"name": "WEIR_SAGA", "value": format!("{namespace}/{name}")}]}
        }))?;
        out.push(Loaded {
            file: l.file.clone(),
            object: Object::Microservice(ms),
        });
    }
    Ok(out)
}

/// Writes the config of each coordinator replica run by [`coordinator_services`]: its log on
/// `log_nats`, its steps calling each Microservice at its sidecar, no trigger of its own (the
/// sidecar pushes), outcomes published through its own sidecar; and points the replica's
/// command at it (`WEIR_SAGA_CONFIG`), with its name as `POD_NAME` (the `by` of its log
/// entries).
pub(super) fn write_coordinator_configs(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: &str,
    log_nats: &str,
    work_dir: &Path,
    services: &mut [LocalService],
) -> Result<()> {
    for saga in coordinator_configs(loaded, namespace, broker_url, services)? {
        let microservice = format!("{}{COORDINATOR_SUFFIX}", saga.name);
        let mut planned = 0;
        for me in services
            .iter_mut()
            .filter(|s| s.microservice == microservice)
        {
            let mut config = saga.config.clone();
            config.broker_url = log_nats.to_string();
            config.credentials_file = None;
            config.trigger.queue = None;
            config.trigger.http = true;
            config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, me.ports.app));
            config.publish_url = Some(format!("http://127.0.0.1:{}", me.ports.admin));
            let path = work_dir.join(format!("{}.saga.json", me.name));
            std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
            me.env.push((
                "WEIR_SAGA_CONFIG".into(),
                path.to_string_lossy().into_owned(),
            ));
            me.env
                .push(("POD_NAME".into(), replica_name(&saga.name, me)));
            planned += 1;
        }
        if planned != saga.replicas {
            bail!(
                "{}: {planned} coordinator service(s) planned for {} replica(s)",
                saga.obj,
                saga.replicas
            );
        }
    }
    Ok(())
}
