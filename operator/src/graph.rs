//! `weir graph`: the system as Mermaid or DOT: services, synchronous calls with their
//! policies, events from publishers to consumers, sagas and their steps, and who may call whom
//! under the mesh's mutual TLS: the calls and steps drawn are the graph's authorization;
//! `allowFrom` adds callers (drawn `allowFrom`), and a service marked `open` or `audit`
//! admits everyone.

use crate::manifest::{Loaded, Object};
use std::fmt::Write;
use weir_crds::microservice::Dependency;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mermaid,
    Dot,
}

/// A node id both formats accept: letters, digits and `_`.
fn id(kind: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{kind}_{clean}")
}

/// `2s, retry 3, breaker 50%, bulkhead 32, fallback`: what protects a call.
pub fn policy_label(d: &Dependency) -> String {
    let mut parts = vec![d.timeout.clone()];
    if let Some(r) = &d.retry {
        parts.push(format!("retry {}", r.attempts));
    }
    if let Some(b) = &d.circuit_breaker {
        parts.push(format!("breaker {}%", b.error_threshold_percentage));
    }
    if let Some(b) = &d.bulkhead {
        parts.push(format!("bulkhead {}", b.max_concurrent));
    }
    if d.fallback.is_some() {
        parts.push("fallback".into());
    }
    parts.join(", ")
}

enum Edge {
    Call {
        label: String,
    },
    Event {
        label: String,
    },
    Step {
        label: String,
    },
    /// `spec.inbound.allowFrom`: a caller admitted beyond the graph.
    Allow,
}

struct Graph {
    nodes: Vec<(String, String, &'static str)>, // id, label, shape
    edges: Vec<(String, String, Edge)>,
}

fn build(objects: &[Loaded]) -> Graph {
    let mut g = Graph {
        nodes: Vec::new(),
        edges: Vec::new(),
    };
    let add_node = |g: &mut Graph, nid: String, label: String, shape: &'static str| {
        if !g.nodes.iter().any(|n| n.0 == nid) {
            g.nodes.push((nid, label, shape));
        }
    };
    for l in objects {
        match &l.object {
            Object::Microservice(ms) => {
                let name = ms.metadata.name.clone().unwrap_or_default();
                let me = id("ms", &name);
                let edge = ms.spec.edge.as_deref();
                let mut label = match edge {
                    Some(_) => format!("{name} (edge)"),
                    None => name.clone(),
                };
                use weir_crds::microservice::AuthorizationPolicy;
                match ms.spec.inbound.authorization {
                    Some(AuthorizationPolicy::Open) => label.push_str(" [open to all callers]"),
                    Some(AuthorizationPolicy::Audit) => label.push_str(" [authorization: audit]"),
                    _ => {}
                }
                add_node(&mut g, me.clone(), label, "service");
                for a in &ms.spec.inbound.allow_from {
                    let from = id("allow", a);
                    add_node(&mut g, from.clone(), a.clone(), "caller");
                    g.edges.push((from, me.clone(), Edge::Allow));
                }
                for d in &ms.spec.dependencies {
                    let (target, label) = match (&d.microservice, &d.url) {
                        (Some(t), _) => (id("ms", t), t.clone()),
                        (_, Some(u)) => (id("ext", &d.name), u.clone()),
                        _ => continue,
                    };
                    add_node(
                        &mut g,
                        target.clone(),
                        label,
                        if d.url.is_some() {
                            "external"
                        } else {
                            "service"
                        },
                    );
                    // At the edge, the path prefixes routed to this dependency come first.
                    let routed: Vec<&str> = edge
                        .map(|e| {
                            e.routes
                                .iter()
                                .filter(|r| r.dependency == d.name)
                                .map(|r| r.path_prefix.as_str())
                                .collect()
                        })
                        .unwrap_or_default();
                    let label = if routed.is_empty() {
                        policy_label(d)
                    } else {
                        format!("{}: {}", routed.join(" "), policy_label(d))
                    };
                    g.edges.push((me.clone(), target, Edge::Call { label }));
                }
                for p in &ms.spec.publishes {
                    let q = id("q", &p.queue);
                    add_node(&mut g, q.clone(), p.queue.clone(), "queue");
                    g.edges.push((
                        me.clone(),
                        q,
                        Edge::Event {
                            label: "publishes".into(),
                        },
                    ));
                }
                for c in &ms.spec.consumes {
                    let q = id("q", &c.queue);
                    add_node(&mut g, q.clone(), c.queue.clone(), "queue");
                    g.edges.push((
                        q,
                        me.clone(),
                        Edge::Event {
                            label: format!("POST {}", c.path),
                        },
                    ));
                }
            }
            Object::Queue(q) => {
                let name = q.metadata.name.clone().unwrap_or_default();
                add_node(&mut g, id("q", &name), name, "queue");
            }
            Object::Saga(s) => {
                let name = s.metadata.name.clone().unwrap_or_default();
                let me = id("saga", &name);
                add_node(&mut g, me.clone(), format!("saga {name}"), "saga");
                if let Some(q) = &s.spec.trigger.queue {
                    add_node(&mut g, id("q", q), q.clone(), "queue");
                    g.edges.push((
                        id("q", q),
                        me.clone(),
                        Edge::Event {
                            label: "starts".into(),
                        },
                    ));
                }
                for (i, step) in s.spec.steps.iter().enumerate() {
                    let target = step
                        .action
                        .http
                        .as_ref()
                        .and_then(|h| h.microservice.clone());
                    if let Some(t) = target {
                        add_node(&mut g, id("ms", &t), t.clone(), "service");
                        let comp = if step.compensation.is_some() {
                            ", compensable"
                        } else {
                            ""
                        };
                        g.edges.push((
                            me.clone(),
                            id("ms", &t),
                            Edge::Step {
                                label: format!("{}. {}{comp}", i + 1, step.name),
                            },
                        ));
                    }
                }
                for o in [&s.spec.on_completed, &s.spec.on_failed]
                    .into_iter()
                    .flatten()
                {
                    add_node(&mut g, id("q", &o.queue), o.queue.clone(), "queue");
                    g.edges.push((
                        me.clone(),
                        id("q", &o.queue),
                        Edge::Event {
                            label: o.event_type.clone(),
                        },
                    ));
                }
            }
            Object::Broker(_) => {}
        }
    }
    g
}

fn esc(s: &str) -> String {
    s.replace('"', "'")
}

pub fn render(objects: &[Loaded], format: Format) -> String {
    let g = build(objects);
    let mut out = String::new();
    match format {
        Format::Mermaid => {
            out.push_str("flowchart LR\n");
            for (nid, label, shape) in &g.nodes {
                let label = esc(label);
                let _ = match *shape {
                    "queue" => writeln!(out, "  {nid}[(\"{label}\")]"),
                    "saga" => writeln!(out, "  {nid}{{{{\"{label}\"}}}}"),
                    "external" => writeln!(out, "  {nid}>\"{label}\"]"),
                    "caller" => writeln!(out, "  {nid}([\"{label}\"])"),
                    _ => writeln!(out, "  {nid}[\"{label}\"]"),
                };
            }
            for (a, b, e) in &g.edges {
                let _ = match e {
                    Edge::Call { label } => writeln!(out, "  {a} -->|\"{}\"| {b}", esc(label)),
                    Edge::Event { label } => writeln!(out, "  {a} -.->|\"{}\"| {b}", esc(label)),
                    Edge::Step { label } => writeln!(out, "  {a} ==>|\"{}\"| {b}", esc(label)),
                    Edge::Allow => writeln!(out, "  {a} --o|\"allowFrom\"| {b}"),
                };
            }
        }
        Format::Dot => {
            out.push_str("digraph weir {\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n");
            for (nid, label, shape) in &g.nodes {
                let shape = match *shape {
                    "queue" => "cylinder",
                    "saga" => "hexagon",
                    "external" => "cds",
                    "caller" => "ellipse",
                    _ => "box",
                };
                let _ = writeln!(out, "  {nid} [label=\"{}\", shape={shape}];", esc(label));
            }
            for (a, b, e) in &g.edges {
                let (label, style) = match e {
                    Edge::Call { label } => (label.as_str(), "solid"),
                    Edge::Event { label } => (label.as_str(), "dashed"),
                    Edge::Step { label } => (label.as_str(), "bold"),
                    Edge::Allow => ("allowFrom", "dotted"),
                };
                let _ = writeln!(
                    out,
                    "  {a} -> {b} [label=\"{}\", style={style}];",
                    esc(label)
                );
            }
            out.push_str("}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Schemas, expand_paths, load};

    fn hello() -> Vec<Loaded> {
        let files = expand_paths(&[std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/hello"
        ))])
        .unwrap();
        load(&files, &Schemas::new()).unwrap().0
    }

    #[test]
    fn mermaid_shows_calls_with_policies() {
        let m = render(&hello(), Format::Mermaid);
        assert!(m.starts_with("flowchart LR\n"));
        assert!(
            m.contains(
                r#"ms_orders -->|"2s, retry 3, breaker 50%, bulkhead 32, fallback"| ms_users"#
            ),
            "{m}"
        );
        assert!(
            m.contains(r#"ext_payments_api>"https://payments.example.com"]"#),
            "{m}"
        );
    }

    #[test]
    fn the_edge_and_its_routes_are_marked() {
        let files = expand_paths(&[std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/edge"
        ))])
        .unwrap();
        let m = render(&load(&files, &Schemas::new()).unwrap().0, Format::Mermaid);
        assert!(m.contains(r#"ms_gateway["gateway (edge)"]"#), "{m}");
        assert!(
            m.contains(r#"ms_gateway -->|"/orders: 2s, retry 2, breaker 50%"| ms_orders"#),
            "{m}"
        );
        assert!(
            m.contains(r#"ms_orders -->|"1s, breaker 50%"| ms_catalog"#),
            "{m}"
        );
    }

    #[test]
    fn who_may_call_whom_beyond_the_calls_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: users}\nspec:\n  image: u\n  inbound: {allowFrom: [ops/*, shop/saga/audit]}\n---\napiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: status}\nspec:\n  image: s\n  inbound: {authorization: open}\n",
        )
        .unwrap();
        let loaded = load(&[f], &Schemas::new()).unwrap().0;
        let m = render(&loaded, Format::Mermaid);
        assert!(m.contains(r#"allow_ops__(["ops/*"])"#), "{m}");
        assert!(
            m.contains(r#"allow_ops__ --o|"allowFrom"| ms_users"#),
            "{m}"
        );
        assert!(
            m.contains(r#"allow_shop_saga_audit --o|"allowFrom"| ms_users"#),
            "{m}"
        );
        assert!(
            m.contains(r#"ms_status["status [open to all callers]"]"#),
            "{m}"
        );
        let d = render(&loaded, Format::Dot);
        assert!(
            d.contains(r#"allow_ops__ -> ms_users [label="allowFrom", style=dotted];"#),
            "{d}"
        );
    }

    #[test]
    fn dot_is_a_digraph_with_every_service() {
        let d = render(&hello(), Format::Dot);
        assert!(d.starts_with("digraph weir {"));
        assert!(d.contains("ms_users [label=\"users\", shape=box];"));
        assert!(d.contains("ms_orders -> ms_users"));
        assert!(d.trim_end().ends_with('}'));
    }
}
