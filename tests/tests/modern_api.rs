//! Weir's CRDs against a real modern API server: Kubernetes' apiextensions-apiserver 1.36,
//! built from Debian's Go sources by `tests/apiserver/` (see its README). The server serves
//! CustomResourceDefinitions and custom resources only, which is what these checks need.
//!
//! Runs when `WEIR_MODERN_API_KUBECONFIG` names the server's kubeconfig
//! (`tests/e2e/modern-api.sh` brings the server up and sets it); says that it skipped otherwise.
//!
//! In order, against one server:
//! 1. **Upgrade**: the CRDs as committed before (`tests/apiserver/previous-crds/`) are created,
//!    objects are stored under them, and the current CRDs are applied over them; every stored
//!    object, read back, is still accepted as a new object under the current CRDs.
//! 2. **Install**: every generated CRD is applied (server-side) with no warning and becomes
//!    Established.
//! 3. **Examples**: every Weir object in `examples/` and in `tests/apiserver/objects.yaml` is
//!    accepted by create and by server-side apply.
//! 4. **Parity**: every constraint of the CRDs, enumerated from the generated schemas (each CEL
//!    rule, minimum, maximum, minLength, maxLength, pattern, enum, minItems, maxItems, required,
//!    type and list-map key), is broken in one of the base objects; the server must refuse that
//!    object naming the field, and `weir render` must refuse it naming the same field. A
//!    constraint with no case fails the suite, so a new rule cannot go untested.
//! 5. **Printer columns** come back in the Table format with the values from status.

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::BodyExt;
use kube::Client;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use weir_e2e::wait_for;

const MANAGER: &str = "weir-e2e";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn weir_bin() -> PathBuf {
    std::env::var("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/debug/weir"))
}

#[tokio::test(flavor = "multi_thread")]
async fn crds_on_a_modern_api_server() -> Result<()> {
    let Ok(kubeconfig) = std::env::var("WEIR_MODERN_API_KUBECONFIG") else {
        eprintln!(
            "SKIPPED modern_api: it needs the modern CRD API server: run tests/e2e/modern-api.sh, \
             or set WEIR_MODERN_API_KUBECONFIG (see tests/apiserver/README.md)"
        );
        return Ok(());
    };
    let api = Api::connect(Path::new(&kubeconfig)).await?;
    let version = api.get("/version").await?;
    eprintln!(
        "modern_api: server {} (apiextensions-apiserver)",
        version.2["gitVersion"]
    );

    upgrade_from_previous_crds(&api).await.context("upgrade")?;
    install_current_crds(&api).await.context("install")?;
    kubectl_applies_the_chart_crds(&api, Path::new(&kubeconfig))
        .await
        .context("kubectl")?;
    examples_are_accepted(&api).await.context("examples")?;
    typos_are_refused(&api).await.context("typos")?;
    parity(&api).await.context("parity")?;
    printer_columns(&api).await.context("printer columns")?;
    keda_objects_are_accepted(&api).await.context("KEDA")?;
    Ok(())
}

// --- the server, raw ------------------------------------------------------------------------

/// A thin client that keeps what kube's typed calls hide: the status code, the `Warning`
/// headers and the `Status` causes of a refusal.
struct Api {
    client: Client,
}

type Reply = (http::StatusCode, Vec<String>, Value);

impl Api {
    async fn connect(kubeconfig: &Path) -> Result<Self> {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(Self {
            client: Client::try_from(config)?,
        })
    }

    async fn call(
        &self,
        method: http::Method,
        uri: &str,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply> {
        let mut req = http::Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        if let Some(a) = accept {
            req = req.header(http::header::ACCEPT, a);
        }
        let req = req.body(kube::client::Body::from(body.unwrap_or_default()))?;
        let resp = self.client.send(req).await?;
        let status = resp.status();
        let warnings = resp
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, warnings, value))
    }

    async fn get(&self, uri: &str) -> Result<Reply> {
        self.call(http::Method::GET, uri, None, None, None).await
    }

    async fn create(&self, uri: &str, object: &Value) -> Result<Reply> {
        self.call(
            http::Method::POST,
            uri,
            Some("application/json"),
            None,
            Some(serde_json::to_vec(object)?),
        )
        .await
    }

    /// Server-side apply with Weir's test field manager.
    async fn apply(&self, uri: &str, object: &Value) -> Result<Reply> {
        let sep = if uri.contains('?') { '&' } else { '?' };
        self.call(
            http::Method::PATCH,
            &format!("{uri}{sep}fieldManager={MANAGER}&force=true"),
            Some("application/apply-patch+yaml"),
            None,
            Some(serde_json::to_vec(object)?),
        )
        .await
    }

    async fn delete(&self, uri: &str) -> Result<Reply> {
        self.call(http::Method::DELETE, uri, None, None, None).await
    }
}

const CRD_PATH: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

fn plural(kind: &str) -> &'static str {
    match kind {
        "Microservice" => "microservices",
        "Queue" => "queues",
        "Saga" => "sagas",
        "Broker" => "brokers",
        other => panic!("not a Weir kind: {other}"),
    }
}

fn collection(ns: &str, kind: &str) -> String {
    format!("/apis/weir.dev/v1alpha1/namespaces/{ns}/{}", plural(kind))
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Fields named by a refusal (`details.causes[].field`), and its message.
fn refusal(reply: &Reply) -> (Vec<String>, String) {
    let causes = reply.2["details"]["causes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let fields = causes
        .iter()
        .map(|c| str_of(c, "/field").to_string())
        .collect();
    (fields, str_of(&reply.2, "/message").to_string())
}

/// What `weir render` makes for KEDA (`spec.autoscaling.queueLag`: the example and one consumer
/// on each broker kind) is accepted by a server serving KEDA 2.16's own CRDs
/// (operator/tests/keda/) with strict field validation, and a misspelt field is refused: the
/// rendered objects are KEDA's as its API server sees them, not only as its schema file reads.
async fn keda_objects_are_accepted(api: &Api) -> Result<()> {
    eprintln!("== KEDA's ScaledObject and TriggerAuthentication as weir render makes them");
    let dir = root().join("operator/tests/keda");
    let mut names = Vec::new();
    for file in [
        "keda.sh_scaledobjects.yaml",
        "keda.sh_triggerauthentications.yaml",
    ] {
        let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join(file))?)?;
        let reply = apply_crd(api, &crd).await?;
        if !reply.0.is_success() {
            bail!("{file}: {}", refusal(&reply).1);
        }
        names.push(str_of(&crd, "/metadata/name").to_string());
    }
    for n in &names {
        wait_established(api, n).await?;
    }
    let mut objects = Vec::new();
    for input in [
        "operator/tests/autoscaling/brokers.yaml",
        "examples/autoscaling",
    ] {
        let out = std::process::Command::new(weir_bin())
            .args(["render", "-f"])
            .arg(root().join(input))
            .output()
            .with_context(|| format!("running {}", weir_bin().display()))?;
        if !out.status.success() {
            bail!(
                "weir render -f {input}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for doc in serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout)?) {
            use serde::Deserialize as _;
            let v = Value::deserialize(doc)?;
            if str_of(&v, "/apiVersion") == "keda.sh/v1alpha1" {
                objects.push(v);
            }
        }
    }
    let collection = |o: &Value| {
        let plural = match str_of(o, "/kind") {
            "ScaledObject" => "scaledobjects",
            _ => "triggerauthentications",
        };
        format!(
            "/apis/keda.sh/v1alpha1/namespaces/{}/{plural}",
            str_of(o, "/metadata/namespace")
        )
    };
    for o in &objects {
        let what = format!(
            "{}/{} in {}",
            str_of(o, "/kind"),
            str_of(o, "/metadata/name"),
            str_of(o, "/metadata/namespace")
        );
        let reply = api
            .create(&format!("{}?fieldValidation=Strict", collection(o)), o)
            .await?;
        if !reply.0.is_success() || !reply.1.is_empty() {
            bail!(
                "{what}: {} warnings {:?}: {}",
                reply.0,
                reply.1,
                refusal(&reply).1
            );
        }
    }
    let kinds = |k: &str| objects.iter().filter(|o| str_of(o, "/kind") == k).count();
    if kinds("ScaledObject") < 5 || kinds("TriggerAuthentication") < 3 {
        bail!("too few KEDA objects rendered: {}", objects.len());
    }
    // The same check refuses what KEDA does not know.
    let mut typo = objects
        .iter()
        .find(|o| str_of(o, "/kind") == "ScaledObject")
        .cloned()
        .context("a ScaledObject")?;
    typo["metadata"]["name"] = json!("typo");
    typo["spec"]["minReplicas"] = json!(1);
    let reply = api
        .create(
            &format!("{}?fieldValidation=Strict", collection(&typo)),
            &typo,
        )
        .await?;
    let (fields, message) = refusal(&reply);
    if reply.0.is_success() {
        bail!("a ScaledObject with spec.minReplicas was accepted");
    }
    eprintln!(
        "  ok: {} ScaledObjects and {} TriggerAuthentications accepted with strict field validation; a misspelt one refused: {}",
        kinds("ScaledObject"),
        kinds("TriggerAuthentication"),
        if fields.is_empty() {
            message
        } else {
            fields.join(", ")
        }
    );
    for n in &names {
        api.delete(&format!("{CRD_PATH}/{n}")).await?;
    }
    Ok(())
}

async fn apply_crd(api: &Api, crd: &Value) -> Result<Reply> {
    let name = str_of(crd, "/metadata/name");
    api.apply(&format!("{CRD_PATH}/{name}"), crd).await
}

async fn wait_established(api: &Api, name: &str) -> Result<()> {
    wait_for(
        &format!("CRD {name} Established"),
        Duration::from_secs(30),
        || async {
            let (_, _, crd) = api.get(&format!("{CRD_PATH}/{name}")).await?;
            let established = crd["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            Ok(established.then_some(()))
        },
    )
    .await
}

async fn delete_weir_crds(api: &Api) -> Result<()> {
    for crd in weir_crds::crd::all() {
        let name = crd.metadata.name.unwrap_or_default();
        api.delete(&format!("{CRD_PATH}/{name}")).await?;
        wait_for(
            &format!("CRD {name} gone"),
            Duration::from_secs(60),
            || async {
                let (status, _, _) = api.get(&format!("{CRD_PATH}/{name}")).await?;
                Ok((status == http::StatusCode::NOT_FOUND).then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

fn current_crds() -> Vec<Value> {
    weir_crds::crd::all()
        .iter()
        .map(|c| serde_json::to_value(c).expect("a CRD serializes"))
        .collect()
}

/// YAML documents of a file (or of every `*.yaml` under a directory) as JSON values.
fn documents(path: &Path) -> Result<Vec<(PathBuf, Value)>> {
    let mut files = Vec::new();
    if path.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let p = entry?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    files.push(p);
                }
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            use serde::Deserialize;
            let v = Value::deserialize(doc).with_context(|| file.display().to_string())?;
            if !v.is_null() {
                out.push((file.clone(), v));
            }
        }
    }
    Ok(out)
}

fn is_weir(v: &Value) -> bool {
    str_of(v, "/apiVersion").starts_with("weir.dev/")
}

fn base_objects() -> Result<Vec<Value>> {
    Ok(documents(&root().join("tests/apiserver/objects.yaml"))?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Every Weir object in `examples/` and the base objects, with the file each comes from.
fn weir_objects() -> Result<Vec<(PathBuf, Value)>> {
    let mut all = documents(&root().join("examples"))?;
    all.extend(documents(&root().join("tests/apiserver/objects.yaml"))?);
    all.retain(|(_, v)| is_weir(v));
    Ok(all)
}

// --- 1. upgrade -----------------------------------------------------------------------------

async fn upgrade_from_previous_crds(api: &Api) -> Result<()> {
    eprintln!("== upgrade from tests/apiserver/previous-crds/");
    delete_weir_crds(api).await?;
    let previous = documents(&root().join("tests/apiserver/previous-crds"))?;
    for (file, mut crd) in previous {
        let name = str_of(&crd, "/metadata/name").to_string();
        // A previous CRD may hold a CEL rule that this server cannot compile (the Queue CRD
        // did: `has(self.inline)` on an untyped field). No 1.25+ server could ever have stored
        // it with that rule, so it is created without the rules the server names; the upgrade
        // from it is still checked.
        for _ in 0..5 {
            let reply = api.create(CRD_PATH, &crd).await?;
            if reply.0.is_success() {
                break;
            }
            let (fields, message) = refusal(&reply);
            let uncompilable: Vec<_> = fields
                .iter()
                .filter(|f| f.contains("x-kubernetes-validations"))
                .cloned()
                .collect();
            if uncompilable.is_empty() {
                bail!("{}: previous CRD refused: {message}", file.display());
            }
            eprintln!(
                "  note: previous {name} cannot be created on this server as committed ({message}); \
                 created without the rules it names"
            );
            for f in uncompilable {
                remove_schema_rules(&mut crd, &f);
            }
        }
        wait_established(api, &name).await?;
    }
    // Objects stored under the previous CRDs.
    let ns = "weir-upgrade";
    let mut stored = Vec::new();
    for (file, obj) in weir_objects()? {
        let kind = str_of(&obj, "/kind").to_string();
        let mut obj = obj;
        obj["metadata"]["namespace"] = json!(ns);
        let name = str_of(&obj, "/metadata/name").to_string();
        let reply = api.create(&collection(ns, &kind), &obj).await?;
        if reply.0 == http::StatusCode::CONFLICT {
            continue; // the same name in two examples
        }
        if !reply.0.is_success() {
            // An object written for what the previous CRDs did not have (a gRPC probe, which
            // makes `path` optional) could never have been stored under them: nothing to
            // upgrade. Base objects are stored under both unless marked `test.weir.dev/since`.
            let marked = obj
                .pointer("/metadata/annotations/test.weir.dev~1since")
                .is_some();
            if marked || !file.ends_with("tests/apiserver/objects.yaml") {
                eprintln!(
                    "  note: {kind}/{name} ({}) uses what the previous CRDs did not have: not stored under them ({})",
                    file.display(),
                    refusal(&reply).1
                );
                continue;
            }
            bail!(
                "{kind}/{name} refused under the previous CRDs: {}",
                refusal(&reply).1
            );
        }
        stored.push((kind, name));
    }
    eprintln!("  {} objects stored under the previous CRDs", stored.len());
    for crd in current_crds() {
        let name = str_of(&crd, "/metadata/name").to_string();
        let reply = apply_crd(api, &crd).await?;
        if !reply.0.is_success() {
            bail!(
                "updating {name} to the current CRD refused: {}",
                refusal(&reply).1
            );
        }
        if !reply.1.is_empty() {
            bail!("updating {name} warned: {:?}", reply.1);
        }
        wait_established(api, &name).await?;
    }
    // Every stored object, as the server now returns it, is accepted as a new object: the new
    // rules accept what the old ones let in (an update would be ratcheted; a create is not).
    for (kind, name) in &stored {
        let (_, _, mut obj) = api.get(&format!("{}/{name}", collection(ns, kind))).await?;
        let meta = obj["metadata"].take();
        obj["metadata"] = json!({"name": meta["name"], "namespace": "weir-upgrade-check"});
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        let reply = api
            .create(
                &format!("{}?dryRun=All", collection("weir-upgrade-check", kind)),
                &obj,
            )
            .await?;
        if !reply.0.is_success() {
            bail!(
                "{kind}/{name}, stored under the previous CRD, is refused by the current one: {}",
                refusal(&reply).1
            );
        }
    }
    eprintln!(
        "  ok: current CRDs applied over the previous ones; all {} stored objects still valid",
        stored.len()
    );
    Ok(())
}

/// Removes the rule a refusal names, e.g. field
/// `spec.validation.openAPIV3Schema.properties[spec].properties[schema].x-kubernetes-validations[0].rule`.
fn remove_schema_rules(crd: &mut Value, field: &str) {
    let Some(rest) = field.strip_prefix("spec.validation.openAPIV3Schema") else {
        return;
    };
    for version in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
        let mut node = &mut version["schema"]["openAPIV3Schema"];
        for part in rest.split('.').filter(|p| !p.is_empty()) {
            if let Some(prop) = part
                .strip_prefix("properties[")
                .and_then(|p| p.strip_suffix(']'))
            {
                node = &mut node["properties"][prop];
            } else if part == "items" {
                node = &mut node["items"];
            } else if part.starts_with("x-kubernetes-validations") {
                if let Some(o) = node.as_object_mut() {
                    o.remove("x-kubernetes-validations");
                }
                break;
            }
        }
    }
}

// --- 2. install -------------------------------------------------------------------------------

async fn install_current_crds(api: &Api) -> Result<()> {
    eprintln!("== install the generated CRDs on an empty server");
    delete_weir_crds(api).await?;
    for crd in current_crds() {
        let name = str_of(&crd, "/metadata/name").to_string();
        let reply = api.create(CRD_PATH, &crd).await?;
        if !reply.0.is_success() {
            bail!("{name} refused: {}", refusal(&reply).1);
        }
        if !reply.1.is_empty() {
            bail!("creating {name} warned: {:?}", reply.1);
        }
        wait_established(api, &name).await?;
        // Applying it again (what `helm upgrade` and `kubectl apply --server-side` do).
        let again = apply_crd(api, &crd).await?;
        if !again.0.is_success() || !again.1.is_empty() {
            bail!(
                "re-applying {name}: {} warnings {:?}: {}",
                again.0,
                again.1,
                refusal(&again).1
            );
        }
        eprintln!("  ok: {name} created and re-applied with no warning, Established");
    }
    Ok(())
}

/// `kubectl apply` of the chart's CRDs, as a user runs it (through the discovery front of
/// tests/apiserver/, since this server has no core API): no warning printed. The CRD as
/// committed before this check existed is applied first, as a control: kubectl prints the
/// server's warnings for it, so their absence afterwards means something.
async fn kubectl_applies_the_chart_crds(api: &Api, kubeconfig: &Path) -> Result<()> {
    eprintln!("== kubectl apply of charts/weir/crds/ (through the discovery front)");
    let kubeconfig = kubeconfig.with_file_name("kubectl.kubeconfig");
    let cache = tempfile::tempdir()?;
    let kubectl = |args: &[&str]| -> Result<(bool, String, String)> {
        let out = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .arg("--cache-dir")
            .arg(cache.path())
            .args(args)
            .current_dir(root())
            .output()
            .context("running kubectl (is it on PATH?)")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    delete_weir_crds(api).await?;
    let (ok, _, stderr) = kubectl(&[
        "apply",
        "-f",
        "tests/apiserver/previous-crds/microservices.weir.dev.yaml",
    ])?;
    if !ok || !stderr.contains("Warning: unrecognized format \"uint32\"") {
        bail!("control: the previous Microservice CRD should apply with format warnings: {stderr}");
    }
    eprintln!(
        "  control: the previous CRD warned: {}",
        stderr.trim().replace('\n', " | ")
    );
    for args in [
        &["apply", "-f", "charts/weir/crds/"][..],
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "charts/weir/crds/",
        ][..],
    ] {
        let (ok, stdout, stderr) = kubectl(args)?;
        if !ok || !stderr.trim().is_empty() {
            bail!(
                "kubectl {}: ok={ok}, printed on stderr:\n{stderr}",
                args.join(" ")
            );
        }
        if stdout.lines().count() != 4 {
            bail!(
                "kubectl {}: expected the four CRDs, got:\n{stdout}",
                args.join(" ")
            );
        }
        eprintln!(
            "  ok: kubectl {}: no warning; {}",
            args.join(" "),
            stdout.trim().replace('\n', " | ")
        );
    }
    for crd in current_crds() {
        wait_established(api, str_of(&crd, "/metadata/name")).await?;
    }
    // A user's next steps: the hello example and its columns. (This server publishes no OpenAPI
    // for custom resources, which kubectl's client-side validation asks for.)
    let (ok, _, stderr) = kubectl(&[
        "apply",
        "--validate=false",
        "-n",
        "kubectl-check",
        "-f",
        "examples/hello/",
    ])?;
    if !ok || !stderr.trim().is_empty() {
        bail!("kubectl apply -f examples/hello/: {stderr}");
    }
    let (ok, stdout, stderr) = kubectl(&["get", "microservices", "-n", "kubectl-check"])?;
    let header = stdout.lines().next().unwrap_or_default();
    let columns: Vec<&str> = header.split_whitespace().collect();
    if !ok || columns != ["NAME", "READY", "REPLICAS", "DEPENDENCIES", "AGE"] {
        bail!("kubectl get microservices: {stdout}{stderr}");
    }
    eprintln!("  ok: kubectl get microservices:\n{}", stdout.trim_end());
    Ok(())
}

// --- 3. examples ------------------------------------------------------------------------------

async fn examples_are_accepted(api: &Api) -> Result<()> {
    eprintln!(
        "== every Weir object in examples/ and the base objects: create and server-side apply"
    );
    let mut n = 0;
    for (i, (file, obj)) in weir_objects()?.into_iter().enumerate() {
        let kind = str_of(&obj, "/kind").to_string();
        let name = str_of(&obj, "/metadata/name").to_string();
        // Each object in a namespace of its own: examples reuse names.
        let ns = format!("examples-{i}");
        let mut obj = obj;
        obj["metadata"]["namespace"] = json!(ns);
        let what = format!("{kind}/{name} ({})", file.display());
        let reply = api.create(&collection(&ns, &kind), &obj).await?;
        if !reply.0.is_success() || !reply.1.is_empty() {
            bail!(
                "{what}: create gave {} warnings {:?}: {}",
                reply.0,
                reply.1,
                refusal(&reply).1
            );
        }
        let reply = api
            .apply(&format!("{}/{name}", collection(&ns, &kind)), &obj)
            .await?;
        if !reply.0.is_success() || !reply.1.is_empty() {
            bail!(
                "{what}: server-side apply gave {} warnings {:?}: {}",
                reply.0,
                reply.1,
                refusal(&reply).1
            );
        }
        n += 1;
    }
    if n < 20 {
        bail!("only {n} Weir objects found in examples/ and the base objects");
    }
    eprintln!("  ok: {n} objects accepted by create and by server-side apply, no warnings");
    Ok(())
}

/// A typo inside any block (`retry: {attemps: 5}`) is refused with the field's full path when
/// the client asks for strict field validation, as kubectl does by default; the same object
/// without the typo is accepted, so the refusal is the typo's. Dry runs: nothing is stored.
async fn typos_are_refused(api: &Api) -> Result<()> {
    eprintln!(
        "== a typo inside each block of the base objects: refused by strict field validation"
    );
    let crds = current_crds();
    let bases = base_objects()?;
    let cases = weir_e2e::typos::cases(&crds, &bases);
    if cases.len() < 40 {
        bail!("only {} typo cases from the base objects", cases.len());
    }
    let ns = "typos";
    let create = |obj: &Value| {
        let mut obj = obj.clone();
        obj["metadata"]["namespace"] = json!(ns);
        let uri = format!(
            "{}?dryRun=All&fieldValidation=Strict",
            collection(ns, str_of(&obj, "/kind"))
        );
        async move { api.create(&uri, &obj).await }
    };
    for base in &bases {
        let reply = create(base).await?;
        if !reply.0.is_success() {
            bail!("control: base object refused: {}", refusal(&reply).1);
        }
    }
    for case in &cases {
        let reply = create(&case.object).await?;
        let message = refusal(&reply).1;
        let want = format!("unknown field \"{}\"", case.field);
        if reply.0.is_success() || !message.contains(&want) {
            bail!(
                "{} with {}: got {} {message:?}, wanted a refusal saying {want}",
                case.object_name,
                case.field,
                reply.0
            );
        }
        // `weir render` refuses it too, naming the same field.
        let (ok, stderr) = render_fields(&bases, &case.object)?;
        if ok || !stderr.contains(&case.field) {
            bail!(
                "{} with {}: weir render ok={ok}, wanted the field named: {stderr}",
                case.object_name,
                case.field
            );
        }
    }
    eprintln!(
        "  ok: {} typos refused by the server and by weir render, each naming its full path \
         (e.g. {}); the {} base objects accepted",
        cases.len(),
        cases
            .iter()
            .find(|c| c.field.contains("]."))
            .map_or("", |c| c.field.as_str()),
        bases.len()
    );
    Ok(())
}

// --- 4. parity --------------------------------------------------------------------------------

/// One constraint of a CRD schema, at a schema path (`spec.dependencies[].timeout`).
#[derive(Debug, Clone)]
struct Constraint {
    kind: String,
    /// Schema path: `[]` for "any item".
    path: String,
    what: What,
}

#[derive(Debug, Clone)]
enum What {
    Minimum(f64),
    Maximum(f64),
    MinLength(u64),
    MaxLength(u64),
    Pattern(String),
    Enum(Vec<Value>),
    MinItems(u64),
    MaxItems(u64),
    Required(String),
    Type(String),
    ListMapKey(String),
    Rule { rule: String, field_path: String },
}

fn constraints(kind: &str, schema: &Value) -> Vec<Constraint> {
    let mut out = Vec::new();
    walk(kind, schema, "", &mut out);
    out
}

fn walk(kind: &str, s: &Value, path: &str, out: &mut Vec<Constraint>) {
    let mut push = |what: What| {
        out.push(Constraint {
            kind: kind.to_string(),
            path: path.to_string(),
            what,
        })
    };
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let int = |k: &str| s.get(k).and_then(Value::as_u64);
    if let Some(v) = num("minimum") {
        push(What::Minimum(v));
    }
    if let Some(v) = num("maximum") {
        push(What::Maximum(v));
    }
    if let Some(v) = int("minLength") {
        push(What::MinLength(v));
    }
    if let Some(v) = int("maxLength") {
        push(What::MaxLength(v));
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        push(What::Pattern(p.to_string()));
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        push(What::Enum(e.clone()));
    }
    if let Some(v) = int("minItems") {
        push(What::MinItems(v));
    }
    if let Some(v) = int("maxItems") {
        push(What::MaxItems(v));
    }
    // The types of metadata are the apiserver's own (a wrong one is a 400 decoding error).
    if !path.is_empty()
        && !path.starts_with("metadata")
        && let Some(t) = s.get("type").and_then(Value::as_str)
    {
        push(What::Type(t.to_string()));
    }
    let items = |k: &str| s.get(k).and_then(Value::as_array).into_iter().flatten();
    for r in items("required") {
        push(What::Required(r.as_str().unwrap_or_default().to_string()));
    }
    if s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        for k in items("x-kubernetes-list-map-keys") {
            push(What::ListMapKey(k.as_str().unwrap_or_default().to_string()));
        }
    }
    for r in items("x-kubernetes-validations") {
        push(What::Rule {
            rule: str_of(r, "/rule").to_string(),
            field_path: str_of(r, "/fieldPath").to_string(),
        });
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            // Status is written by the operator through its own subresource.
            if path.is_empty() && k == "status" {
                continue;
            }
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            walk(kind, v, &p, out);
        }
    }
    if let Some(items) = s.get("items") {
        walk(kind, items, &format!("{path}[]"), out);
    }
    // Map values (resources.limits{}) carry no constraint of Weir's own: not walked.
}

/// `spec.dependencies[0].retry` → segments; `[]` (a schema path's "any item") is [`Seg::Any`].
fn segments(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        let key_end = rest.find('[').unwrap_or(rest.len());
        if key_end > 0 {
            out.push(Seg::Key(rest[..key_end].to_string()));
        }
        rest = &rest[key_end..];
        while let Some(close) = rest.find(']') {
            let idx = &rest[1..close];
            out.push(idx.parse().map(Seg::Index).unwrap_or(Seg::Any));
            rest = &rest[close + 1..];
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
    Any,
}

fn field_of(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Any => out.push_str("[]"),
        }
    }
    out
}

/// `spec.steps[1].action` → `spec.steps[].action`.
fn schema_form(path: &str) -> String {
    field_of(
        &segments(path)
            .into_iter()
            .map(|s| match s {
                Seg::Index(_) => Seg::Any,
                other => other,
            })
            .collect::<Vec<_>>(),
    )
}

fn node<'a>(v: &'a Value, segs: &[Seg]) -> Option<&'a Value> {
    segs.iter().try_fold(v, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Index(i) => v.get(*i),
        Seg::Any => v.get(0),
    })
}

/// The first concrete path in `v` matching `segs` (`[]` tried at each index) that exists.
fn find(v: &Value, segs: &[Seg]) -> Option<Vec<Seg>> {
    let Some((first, rest)) = segs.split_first() else {
        return Some(vec![]);
    };
    match first {
        Seg::Key(k) => {
            let mut tail = find(v.get(k)?, rest)?;
            tail.insert(0, first.clone());
            Some(tail)
        }
        Seg::Index(i) => {
            let mut tail = find(v.get(*i)?, rest)?;
            tail.insert(0, first.clone());
            Some(tail)
        }
        Seg::Any => v.as_array()?.iter().enumerate().find_map(|(i, item)| {
            let mut tail = find(item, rest)?;
            tail.insert(0, Seg::Index(i));
            Some(tail)
        }),
    }
}

/// Sets `value` at `segs` under `v`, making objects on the way; `None` removes it.
fn set(v: &mut Value, segs: &[Seg], value: Option<Value>) {
    let (last, parents) = segs.split_last().expect("a path");
    let mut cur = v;
    for s in parents {
        cur = match s {
            Seg::Key(k) => {
                if cur.get(k).is_none() {
                    cur[k.as_str()] = json!({});
                }
                cur.get_mut(k).unwrap()
            }
            Seg::Index(i) => cur.get_mut(*i).expect("array item exists"),
            Seg::Any => unreachable!("a concrete path"),
        };
    }
    match (last, value) {
        (Seg::Key(k), Some(val)) => cur[k.as_str()] = val,
        (Seg::Key(k), None) => {
            if let Some(o) = cur.as_object_mut() {
                o.remove(k);
            }
        }
        (Seg::Index(i), Some(val)) => cur[*i] = val,
        (Seg::Index(i), None) => {
            if let Some(a) = cur.as_array_mut() {
                a.remove(*i);
            }
        }
        (Seg::Any, _) => unreachable!("a concrete path"),
    }
}

/// One object broken in one way, and the field both refusals must name.
struct Case {
    label: String,
    object: Value,
    field: String,
}

/// A change that breaks a CEL rule: at `node` (a concrete path), set or remove fields given
/// relative to it. The suite fails when a rule of the CRDs has no case here.
struct RuleCase {
    kind: &'static str,
    object: &'static str,
    node: &'static str,
    rule_starts: &'static str,
    set: &'static [(&'static str, &'static str)],
    remove: &'static [&'static str],
}

static RULE_CASES: &[RuleCase] = &[
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec",
        rule_starts: "!has(self.autoscaling)",
        set: &[(
            "autoscaling.queueLag",
            r#"[{"queue": "invoices", "targetLagPerReplica": 5}]"#,
        )],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.autoscaling",
        rule_starts: "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
        set: &[("minReplicas", "11")],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.autoscaling",
        rule_starts: "has(self.targetCPUUtilizationPercentage)",
        set: &[],
        remove: &[
            "targetCPUUtilizationPercentage",
            "targetMemoryUtilizationPercentage",
            "queueLag",
        ],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.autoscaling",
        rule_starts: "!has(self.minReplicas) || self.minReplicas > 0",
        set: &[("minReplicas", "0")],
        remove: &["queueLag"],
    },
    RuleCase {
        kind: "Broker",
        object: "nats",
        node: "spec",
        rule_starts: "has(self.url) != has(self.managed)",
        set: &[("managed", r#"{"storage": "1Gi"}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Broker",
        object: "nats",
        node: "spec",
        rule_starts: "has(self.url) != has(self.managed)",
        set: &[],
        remove: &["url"],
    },
    RuleCase {
        kind: "Broker",
        object: "nats",
        node: "spec",
        rule_starts: "!has(self.vhost)",
        set: &[("vhost", r#""shop""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Broker",
        object: "managed",
        node: "spec",
        rule_starts: "!has(self.managed) || self.kind != 'kafka'",
        set: &[("kind", r#""kafka""#)],
        remove: &[],
    },
    // (The base objects are stored under the previous CRDs too, which know no kafka kind: the
    // kafka cases turn a NATS base into one.)
    RuleCase {
        kind: "Broker",
        object: "nats",
        node: "spec",
        rule_starts: "!has(self.url) || self.kind != 'kafka'",
        set: &[("kind", r#""kafka""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Broker",
        object: "nats",
        node: "spec",
        rule_starts: "!has(self.url) || self.kind != 'kafka'",
        set: &[("kind", r#""kafka""#), ("url", r#""kafka://k1.example""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec",
        rule_starts: "self.port != 15001",
        set: &[("port", "15001")],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec",
        rule_starts: "self.port != 15001",
        set: &[("port", "15150")],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "users",
        node: "spec",
        rule_starts: "has(self.image) ||",
        set: &[],
        remove: &["image"],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "has(self.microservice) != has(self.url)",
        set: &[("url", r#""http://users.example.com""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[1]",
        rule_starts: "has(self.microservice) != has(self.url)",
        set: &[],
        remove: &["url"],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.probes.liveness",
        rule_starts: "!(has(self.path) && has(self.grpc))",
        set: &[("grpc", r#"{"service": "shop.Orders"}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.probes.readiness",
        rule_starts: "!(has(self.path) && has(self.grpc))",
        set: &[("grpc", r#"{}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec",
        rule_starts: "!has(self.probes) || ((!has(self.probes.liveness)",
        set: &[("probes.readiness", r#"{"grpc": {}}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "!has(self.protocol) || has(self.url)",
        set: &[("protocol", r#""grpc""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "!has(self.retry) || !has(self.retry.backoff)",
        set: &[("retry.backoff", r#"{"base": "2s", "max": "1s"}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "!has(self.loadBalancer) || duration(self.loadBalancer.decay) > ",
        set: &[("loadBalancer.decay", r#""0s""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[1]",
        rule_starts: "!has(self.loadBalancer) || duration(self.loadBalancer.decay) > ",
        set: &[("loadBalancer.decay", r#""0ms""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "!has(self.outlierDetection) || duration(self.outlierDetection.baseEjectionTime) > ",
        set: &[("outlierDetection.baseEjectionTime", r#""0s""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[0]",
        rule_starts: "!has(self.outlierDetection) || duration(self.outlierDetection.maxEjectionTime) >= ",
        set: &[("outlierDetection.maxEjectionTime", r#""10s""#)],
        remove: &[],
    },
    // The url dependency sets neither time: the defaults (30s, 5m) are applied before the
    // rule, so a base of 10m alone breaks it.
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.dependencies[1]",
        rule_starts: "!has(self.outlierDetection) || duration(self.outlierDetection.maxEjectionTime) >= ",
        set: &[("outlierDetection.baseEjectionTime", r#""10m""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "gateway",
        node: "spec.edge.cors",
        rule_starts: "!self.allowCredentials",
        set: &[("allowOrigins", r#"["https://shop.example.com", "*"]"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "gateway",
        node: "spec.edge.jwt",
        rule_starts: "[has(self.jwks)",
        set: &[("jwksUri", r#""https://id.example.com/jwks""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Microservice",
        object: "gateway",
        node: "spec.edge.jwt",
        rule_starts: "[has(self.jwks)",
        set: &[],
        remove: &["hmacSecretRef"],
    },
    RuleCase {
        kind: "Microservice",
        object: "orders",
        node: "spec.inbound",
        rule_starts: "!has(self.maxQueue)",
        set: &[],
        remove: &["maxConcurrent"],
    },
    RuleCase {
        kind: "Queue",
        object: "orders",
        node: "spec.consumer",
        rule_starts: "size(self.backoff) <= self.maxDeliveries",
        set: &[("maxDeliveries", "1")],
        remove: &[],
    },
    RuleCase {
        kind: "Queue",
        object: "orders",
        node: "spec.schema",
        rule_starts: "has(self.inline) != has(self.configMapRef)",
        set: &[(
            "configMapRef",
            r#"{"name": "schemas", "key": "orders.json"}"#,
        )],
        remove: &[],
    },
    RuleCase {
        kind: "Queue",
        object: "orders",
        node: "spec.schema",
        rule_starts: "has(self.inline) != has(self.configMapRef)",
        set: &[],
        remove: &["inline"],
    },
    RuleCase {
        kind: "Saga",
        object: "place-order",
        node: "spec.steps[0].action",
        rule_starts: "has(self.http) != has(self.request)",
        set: &[("request", r#"{"subject": "stock.reserve"}"#)],
        remove: &[],
    },
    RuleCase {
        kind: "Saga",
        object: "place-order",
        node: "spec.steps[0].compensation",
        rule_starts: "has(self.http) != has(self.request)",
        set: &[],
        remove: &["http"],
    },
    RuleCase {
        kind: "Saga",
        object: "place-order",
        node: "spec.steps[0].action.http",
        rule_starts: "has(self.microservice) != has(self.url)",
        set: &[("url", r#""https://stock.example.com""#)],
        remove: &[],
    },
    RuleCase {
        kind: "Saga",
        object: "place-order",
        node: "spec.steps[0].compensation.http",
        rule_starts: "has(self.microservice) != has(self.url)",
        set: &[],
        remove: &["url"],
    },
];

fn join(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.trim_start_matches('.')) {
        (_, "") => base.to_string(),
        (true, r) => r.to_string(),
        (false, r) => format!("{base}.{r}"),
    }
}

/// A string that does not match `pattern`.
fn not_matching(pattern: &str) -> Result<String> {
    let re = regex::Regex::new(pattern)?;
    ["!", " x", "UPPER CASE", "-1", "http://", "a b/c", ""]
        .iter()
        .map(|s| s.to_string())
        .find(|s| !re.is_match(s))
        .ok_or_else(|| anyhow!("no candidate breaks pattern {pattern}"))
}

/// A value of the wrong JSON type for a schema `type`.
fn wrong_type(t: &str) -> Value {
    match t {
        "string" => json!(12),
        "object" | "array" | "integer" | "number" | "boolean" => json!("not-a-value"),
        _ => json!(null),
    }
}

/// The cases for one constraint, built from the base objects; an error for a constraint that no
/// base object can break.
fn cases_for(c: &Constraint, bases: &[Value]) -> Result<Vec<Case>> {
    let of_kind: Vec<&Value> = bases
        .iter()
        .filter(|b| str_of(b, "/kind") == c.kind)
        .collect();
    let schema_segs = segments(&c.path);
    let label = |obj: &Value, field: &str, what: &str| {
        format!(
            "{}/{} {field}: {what}",
            c.kind,
            str_of(obj, "/metadata/name")
        )
    };
    // The first base object and concrete path holding the field (`want_field`), else its parent.
    let locate = |want: &dyn Fn(&Value) -> bool| -> Option<(&Value, Vec<Seg>)> {
        of_kind.iter().copied().find_map(|b| {
            let segs = find(b, &schema_segs)?;
            want(node(b, &segs)?).then_some((b, segs))
        })
    };
    let locate_parent = || -> Option<(&Value, Vec<Seg>)> {
        let (last, parent) = schema_segs.split_last()?;
        let Seg::Key(k) = last else { return None };
        of_kind.iter().copied().find_map(|b| {
            let mut segs = find(b, parent)?;
            node(b, &segs)?.is_object().then(|| {
                segs.push(Seg::Key(k.clone()));
                (b, segs)
            })
        })
    };
    let with = |obj: &Value, segs: &[Seg], value: Option<Value>| {
        let mut o = obj.clone();
        set(&mut o, segs, value);
        o
    };
    let mut out = Vec::new();
    match &c.what {
        What::Rule { rule, field_path } => {
            for r in rule_cases(c, rule) {
                let obj = of_kind
                    .iter()
                    .find(|b| str_of(b, "/metadata/name") == r.object)
                    .ok_or_else(|| anyhow!("no base {} {}", r.kind, r.object))?;
                let mut o = (*obj).clone();
                for (k, v) in r.set {
                    set(
                        &mut o,
                        &segments(&join(r.node, k)),
                        Some(serde_json::from_str(v)?),
                    );
                }
                for k in r.remove {
                    set(&mut o, &segments(&join(r.node, k)), None);
                }
                let field = join(r.node, field_path);
                out.push(Case {
                    label: label(obj, r.node, &format!("rule `{rule}`")),
                    object: o,
                    field,
                });
            }
            if out.is_empty() {
                bail!(
                    "no case breaks the rule at {:?}: `{rule}`; add one to RULE_CASES",
                    c.path
                );
            }
        }
        What::Required(prop) => {
            let (obj, mut segs) = locate(&|n| n.get(prop).is_some())
                .ok_or_else(|| anyhow!("no base {} sets {}.{prop}", c.kind, c.path))?;
            segs.push(Seg::Key(prop.clone()));
            let field = field_of(&segs);
            out.push(Case {
                label: label(obj, &field, "required, left out"),
                object: with(obj, &segs, None),
                field,
            });
        }
        What::ListMapKey(key) => {
            let (obj, segs) = locate(&|n| n.as_array().is_some_and(|a| !a.is_empty()))
                .ok_or_else(|| anyhow!("no base {} has items in {}", c.kind, c.path))?;
            let mut list = node(obj, &segs)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            list.push(list[0].clone());
            let field = format!("{}[{}]", field_of(&segs), list.len() - 1);
            out.push(Case {
                label: label(obj, &field, &format!("duplicate {key}")),
                object: with(obj, &segs, Some(Value::Array(list))),
                field,
            });
        }
        other => {
            let (obj, segs) = locate(&|_| true)
                .or_else(locate_parent)
                .ok_or_else(|| anyhow!("no base {} has {} or its parent", c.kind, c.path))?;
            let current = node(obj, &segs).cloned();
            let bad = match other {
                What::Minimum(m) => json!((*m as i64) - 1),
                What::Maximum(m) if current.as_ref().is_some_and(Value::is_f64) => json!(m + 0.5),
                What::Maximum(m) => json!((*m as i64) + 1),
                What::MinLength(0) | What::MinItems(0) => return Ok(out),
                What::MinLength(n) => json!("a".repeat(*n as usize - 1)),
                What::MaxLength(n) => json!("1s".repeat(*n as usize / 2 + 1)),
                What::Pattern(p) => json!(not_matching(p)?),
                What::Enum(allowed) => {
                    let bad = json!("NotOneOfThem");
                    if allowed.contains(&bad) {
                        bail!("{}: the enum allows {bad}", c.path);
                    }
                    bad
                }
                What::MinItems(n) => {
                    let list = current
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default();
                    Value::Array(list.into_iter().take(*n as usize - 1).collect())
                }
                What::MaxItems(n) => {
                    let list = current
                        .and_then(|v| v.as_array().cloned())
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| anyhow!("no base {} has items in {}", c.kind, c.path))?;
                    Value::Array(
                        (0..=*n as usize)
                            .map(|i| distinct(&list[i % list.len()], i))
                            .collect(),
                    )
                }
                What::Type(t) => wrong_type(t),
                What::Required(_) | What::ListMapKey(_) | What::Rule { .. } => unreachable!(),
            };
            let field = field_of(&segs);
            out.push(Case {
                label: label(obj, &field, &format!("{other:?}, set to {bad}")),
                object: with(obj, &segs, Some(bad)),
                field,
            });
        }
    }
    Ok(out)
}

/// The cases of [`RULE_CASES`] for the rule `rule` at the constraint's place.
fn rule_cases<'a>(
    c: &'a Constraint,
    rule: &'a str,
) -> impl Iterator<Item = &'static RuleCase> + 'a {
    RULE_CASES.iter().filter(move |r| {
        r.kind == c.kind && rule.starts_with(r.rule_starts) && schema_form(r.node) == c.path
    })
}

/// Item `i` of a list made longer than allowed, with its key fields made distinct so that only
/// the length is wrong.
fn distinct(item: &Value, i: usize) -> Value {
    let mut item = item.clone();
    for key in ["name", "queue", "pathPrefix"] {
        if let Some(Value::String(s)) = item.get(key) {
            let unique = if key == "pathPrefix" {
                format!("{s}/p{i}")
            } else {
                format!("{s}{i}")
            };
            item[key] = json!(unique);
        }
    }
    match item {
        Value::String(s) if s.chars().all(|c| c.is_ascii_alphabetic() || c == '-') => {
            json!(format!("{s}{}", "x".repeat(i % 3)))
        }
        other => other,
    }
}

/// `weir render` of the base objects with `object` put in place of its base: the fields it
/// names for `object`, or none when it renders.
fn render_fields(bases: &[Value], object: &Value) -> Result<(bool, String)> {
    let kind = str_of(object, "/kind");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("objects.yaml");
    let original = bases.iter().position(|b| {
        str_of(b, "/kind") == kind
            && str_of(b, "/metadata/name") == str_of(object, "/metadata/name")
    });
    let mut docs: Vec<Value> = bases.to_vec();
    match original {
        Some(i) => docs[i] = object.clone(),
        None => docs.push(object.clone()),
    }
    let text = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    std::fs::write(&file, text)?;
    let out = std::process::Command::new(weir_bin())
        .arg("render")
        .arg("-f")
        .arg(&file)
        .output()
        .with_context(|| format!("running {}", weir_bin().display()))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn parity(api: &Api) -> Result<()> {
    eprintln!(
        "== parity: each constraint of the CRDs, broken, is refused by the server and by weir render"
    );
    let bases = base_objects()?;
    // The base objects are valid on both sides.
    let (ok, stderr) = render_fields(&bases, &bases[0])?;
    if !ok {
        bail!("weir render refuses the base objects:\n{stderr}");
    }
    let ns = "parity";
    for b in &bases {
        let reply = api
            .create(
                &format!("{}?dryRun=All", collection(ns, str_of(b, "/kind"))),
                b,
            )
            .await?;
        if !reply.0.is_success() {
            bail!(
                "the server refuses base {}/{}: {}",
                str_of(b, "/kind"),
                str_of(b, "/metadata/name"),
                refusal(&reply).1
            );
        }
    }
    let mut all = Vec::new();
    for crd in current_crds() {
        let kind = str_of(&crd, "/spec/names/kind").to_string();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        all.extend(constraints(&kind, schema));
    }
    let mut failures = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut cases = Vec::new();
    for c in &all {
        match cases_for(c, &bases) {
            Ok(cs) => cases.extend(cs),
            Err(e) => failures.push(format!("{}: {e}", c.kind)),
        }
    }
    // A case for a rule that no longer exists is a stale test.
    for r in RULE_CASES {
        let used = all.iter().any(|c| match &c.what {
            What::Rule { rule, .. } => rule_cases(c, rule).any(|x| std::ptr::eq(x, r)),
            _ => false,
        });
        if !used {
            failures.push(format!(
                "RULE_CASES has a case for a rule the CRDs no longer hold: {} {} `{}`",
                r.kind, r.node, r.rule_starts
            ));
        }
    }
    for case in &cases {
        let kind = str_of(&case.object, "/kind").to_string();
        *counts.entry(kind.clone()).or_default() += 1;
        let reply = api
            .create(
                &format!("{}?dryRun=All", collection(ns, &kind)),
                &case.object,
            )
            .await?;
        let (fields, message) = refusal(&reply);
        if reply.0 != http::StatusCode::UNPROCESSABLE_ENTITY {
            failures.push(format!(
                "{}: the server answered {} (want 422 Invalid): {message}",
                case.label, reply.0
            ));
        } else if !fields.contains(&case.field) {
            failures.push(format!(
                "{}: the server refused it but named {fields:?}, not {:?}: {message}",
                case.label, case.field
            ));
        }
        let (ok, stderr) = render_fields(&bases, &case.object)?;
        let object = format!("{kind}/{}", str_of(&case.object, "/metadata/name"));
        let named = format!("{object}: {}: ", case.field);
        if ok {
            failures.push(format!("{}: weir render accepted it", case.label));
        } else if !stderr.contains(&named) {
            failures.push(format!(
                "{}: weir render refused it but did not name {:?}:\n{}",
                case.label,
                case.field,
                stderr.trim_end()
            ));
        }
    }
    eprintln!(
        "  {} constraints, {} cases ({counts:?})",
        all.len(),
        cases.len()
    );
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("  FAIL {f}");
        }
        bail!("{} of {} parity cases failed", failures.len(), cases.len());
    }
    eprintln!("  ok: every case refused by the server and by weir render, naming the same field");
    Ok(())
}

// --- 5. printer columns -------------------------------------------------------------------

async fn printer_columns(api: &Api) -> Result<()> {
    eprintln!("== printer columns in the Table format");
    let ns = "columns";
    for b in base_objects()? {
        let kind = str_of(&b, "/kind").to_string();
        let mut b = b;
        b["metadata"]["namespace"] = json!(ns);
        let reply = api.create(&collection(ns, &kind), &b).await?;
        if !reply.0.is_success() {
            bail!("create {kind}: {}", refusal(&reply).1);
        }
    }
    // Status as the operator writes it.
    let now = "2026-01-01T00:00:00Z";
    let ready = |reason: &str| {
        json!([{"type": "Ready", "status": "True", "reason": reason, "message": "ok",
                "lastTransitionTime": now}])
    };
    let statuses = [
        (
            "Microservice",
            "orders",
            json!({"conditions": ready("Ready"), "replicaSummary": "2/2",
                   "dependencySummary": "2/2"}),
        ),
        (
            "Queue",
            "orders",
            json!({"conditions": ready("Declared"), "messages": 42, "deadLetters": 3}),
        ),
        (
            "Broker",
            "nats",
            json!({"conditions": [{"type": "Connected", "status": "True", "reason": "Connected",
                   "message": "ok", "lastTransitionTime": now}], "serverVersion": "2.15.1"}),
        ),
        (
            "Saga",
            "place-order",
            json!({"conditions": ready("Ready"), "steps": 2, "running": 1, "completed": 7,
                   "compensated": 2, "failed": 0}),
        ),
    ];
    for (kind, name, status) in &statuses {
        let reply = api
            .call(
                http::Method::PATCH,
                &format!("{}/{name}/status", collection(ns, kind)),
                Some("application/merge-patch+json"),
                None,
                Some(serde_json::to_vec(&json!({ "status": status }))?),
            )
            .await?;
        if !reply.0.is_success() {
            bail!("status of {kind}/{name}: {}", refusal(&reply).1);
        }
    }
    type Cells = &'static [(&'static str, &'static str)];
    let want: [(&str, &str, Cells); 4] = [
        (
            "Microservice",
            "orders",
            &[
                ("Ready", "True"),
                ("Replicas", "2/2"),
                ("Dependencies", "2/2"),
                ("Reason", "Ready"),
            ],
        ),
        (
            "Queue",
            "orders",
            &[
                ("Ready", "True"),
                ("Broker", "nats"),
                ("Messages", "42"),
                ("Dead-Letters", "3"),
            ],
        ),
        (
            "Broker",
            "nats",
            &[
                ("Kind", "nats"),
                ("Connected", "True"),
                ("Version", "2.15.1"),
            ],
        ),
        (
            "Saga",
            "place-order",
            &[
                ("Ready", "True"),
                ("Steps", "2"),
                ("Running", "1"),
                ("Completed", "7"),
            ],
        ),
    ];
    for (kind, name, cells) in want {
        let reply = api
            .call(
                http::Method::GET,
                &collection(ns, kind),
                None,
                Some("application/json;as=Table;v=v1;g=meta.k8s.io"),
                None,
            )
            .await?;
        let table = &reply.2;
        if table["kind"] != "Table" {
            bail!("{kind}: not a Table: {table}");
        }
        let columns: Vec<String> = table["columnDefinitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| str_of(c, "/name").to_string())
            .collect();
        let row = table["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["cells"][0] == name)
            .ok_or_else(|| anyhow!("{kind}: no row for {name} in {table}"))?;
        for (column, value) in cells {
            let i = columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(column))
                .ok_or_else(|| anyhow!("{kind}: no column {column:?} in {columns:?}"))?;
            let cell = match &row["cells"][i] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if cell != *value {
                bail!(
                    "{kind}/{name}: column {column} is {cell:?}, want {value:?} (columns {columns:?})"
                );
            }
        }
        eprintln!("  ok: {kind} columns {columns:?}, row {}", row["cells"]);
    }
    Ok(())
}
