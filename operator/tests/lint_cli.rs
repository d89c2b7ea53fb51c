//! `weir lint`, `weir graph` and the lint gate of `weir render`, through the binary.

use std::path::Path;
use std::process::{Command, Output};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .unwrap()
}

#[test]
fn the_test_set_triggers_every_rule_and_exits_1() {
    let out = weir(&["lint", "-f", "operator/tests/lint"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    for rule in [
        "WEIR001", "WEIR002", "WEIR003", "WEIR004", "WEIR005", "WEIR006", "WEIR007", "WEIR008",
    ] {
        assert!(
            text.contains(&format!("[{rule}]")),
            "{rule} missing in:\n{text}"
        );
    }
    assert!(text.contains("error[WEIR001] shared-database"), "{text}");
    assert!(
        text.contains("objects: Microservice/billing, Microservice/invoices"),
        "{text}"
    );
    assert!(text.contains("hint: "), "{text}");
}

#[test]
fn the_examples_lint_clean() {
    let out = weir(&["lint", "-f", "examples/"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn render_refuses_lint_errors_unless_told() {
    let out = weir(&["render", "-f", "operator/tests/lint/monolith.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WEIR002"));
    let forced = weir(&[
        "render",
        "-f",
        "operator/tests/lint/monolith.yaml",
        "--skip-lint",
    ]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
}

#[test]
fn graph_prints_mermaid_and_dot() {
    let m = weir(&["graph", "-f", "examples/"]);
    assert!(m.status.success());
    assert!(
        String::from_utf8(m.stdout)
            .unwrap()
            .starts_with("flowchart LR")
    );
    let d = weir(&["graph", "-f", "operator/tests/lint", "--format", "dot"]);
    let dot = String::from_utf8(d.stdout).unwrap();
    assert!(dot.contains("q_refunds -> ms_ledger"), "{dot}");
    assert!(dot.contains("ms_orders -> q_order_audit"), "{dot}");
}

#[test]
fn the_shop_lints_without_findings_and_its_graph_renders() {
    let out = weir(&["lint", "-f", "examples/shop"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 error(s), 0 warning(s)"), "{text}");
    let g = weir(&["graph", "-f", "examples/shop"]);
    assert!(g.status.success());
    let mermaid = String::from_utf8(g.stdout).unwrap();
    for edge in [
        r#"ms_orders -->|"300ms, breaker 50%, fallback"| ms_users"#,
        r#"ms_gateway -->|"10s, breaker 50%, bulkhead 64"| ms_orders"#,
        r#"q_orders -.->|"starts"| saga_place_order"#,
        r#"saga_place_order ==>|"2. charge, compensable"| ms_payments"#,
        r#"q_payments_captured -.->|"POST /events/payment-captured"| ms_notifications"#,
    ] {
        assert!(mermaid.contains(edge), "missing {edge}:\n{mermaid}");
    }
}
