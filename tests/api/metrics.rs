//! Prometheus metrics on the admin listener: the families, their types and
//! labels, promtool's verdict, and that the public port does not serve them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem, eventually, fresh_connection_client, spawn_app};

/// One sample line: the metric name and its labels.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// `# TYPE` lines and the samples of an exposition. Written by hand rather than
/// with a parser crate: route templates put `{` and `}` inside label values,
/// which the common parser crates mishandle.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match (line.find('{'), line.rfind('}')) {
            (Some(open), Some(close)) => (&line[..open], parse_labels(&line[open + 1..close])),
            _ => (line.split_whitespace().next().unwrap_or(""), BTreeMap::new()),
        };
        samples.push(Sample { name: name.to_owned(), labels });
    }
    (types, samples)
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 2..];
        let mut end = 0;
        let bytes = after.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        labels.insert(name, after[..end].to_owned());
        rest = &after[(end + 1).min(after.len())..];
    }
    labels
}

/// Label names seen on samples of `family` (histograms: on `_bucket`, without `le`).
fn label_names(samples: &[Sample], family: &str) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|s| s.name == family || s.name == format!("{family}_bucket"))
        .flat_map(|s| s.labels.keys().cloned())
        .filter(|l| l != "le")
        .collect()
}

async fn drive_traffic(app: &TestApp) {
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    assert_eq!(app.place_bid(&app.bidder(2), id, 100).await.status(), StatusCode::CREATED);
    assert_eq!(app.place_bid(&app.bidder(3), id, 50).await.status(), StatusCode::CONFLICT);
    let stock = app.put_inventory(&app.seller(), "metric-sku", "t", 5).await;
    assert_eq!(stock.status(), StatusCode::CREATED);
    let order =
        app.post_json("/api/orders", &app.bidder(4), &json!({"lines": [{"sku": "metric-sku", "quantity": 1}]})).await;
    assert_eq!(order.status(), StatusCode::CREATED);
    // Fresh connections land on both cores.
    let client = fresh_connection_client();
    for _ in 0..12 {
        client.get(app.url(&format!("/api/auctions/{id}"))).send().await.unwrap();
    }
    app.get("/no/such/route/12345").await;
}

/// Every family the SREs rely on is exported with its type and fixed labels; per-core
/// families carry `core`, routes are templates (never raw paths).
#[tokio::test]
async fn the_metric_families_have_the_right_types_and_labels() {
    let app = spawn_app().await;
    drive_traffic(&app).await;
    let text = eventually(std::time::Duration::from_secs(5), "both cores' requests are counted", || async {
        let text = app.scrape().await;
        let (_, samples) = parse(&text);
        let cores: BTreeSet<String> = samples
            .iter()
            .filter(|s| s.name == "http_requests_total")
            .filter_map(|s| s.labels.get("core").cloned())
            .collect();
        (cores.len() == 2).then_some(text)
    })
    .await;
    let (types, samples) = parse(&text);
    let expected: &[(&str, &str, &[&str])] = &[
        ("http_requests_total", "counter", &["core", "method", "route", "status"]),
        ("http_request_duration_seconds", "histogram", &["core", "method", "route"]),
        ("http_requests_in_flight", "gauge", &["core"]),
        ("gavel_bids_total", "counter", &["core", "outcome"]),
        ("gavel_bid_batch_size", "histogram", &["core"]),
        ("gavel_bid_batches_in_flight", "histogram", &["core"]),
        ("gavel_bid_batch_wait_seconds", "histogram", &["core", "stage"]),
        ("gavel_orders_total", "counter", &["core", "outcome"]),
        ("gavel_order_batch_size", "histogram", &["core"]),
        ("gavel_db_query_duration_seconds", "histogram", &["core", "query"]),
        ("gavel_db_pool_connections", "gauge", &["core", "state"]),
        ("gavel_cache_notifications_total", "counter", &["core", "kind", "result"]),
        ("gavel_cache_notify_lag_seconds", "histogram", &["core"]),
        ("gavel_cache_listener_reconnects_total", "counter", &["core"]),
        ("gavel_cache_live", "gauge", &["core"]),
        ("gavel_cache_entries", "gauge", &["cache", "core"]),
        ("gavel_cache_evictions_total", "counter", &["cache", "core", "reason"]),
        ("process_cpu_seconds_total", "counter", &[]),
        ("process_resident_memory_bytes", "gauge", &[]),
        ("process_open_fds", "gauge", &[]),
        ("process_start_time_seconds", "gauge", &[]),
        ("gavel_build_info", "gauge", &["version"]),
    ];
    for (family, kind, labels) in expected {
        assert_eq!(types.get(*family).map(String::as_str), Some(*kind), "type of {family}");
        let want: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
        assert_eq!(label_names(&samples, family), want, "labels of {family}");
    }
    // Histograms have real buckets, down to 50 µs for latency; never summaries.
    assert!(types.values().all(|t| t != "summary"));
    assert!(samples.iter().any(|s| s.name == "http_request_duration_seconds_bucket"
        && s.labels.get("le").map(String::as_str) == Some("0.00005")));
    // Routes are templates, and unknown paths share one label.
    let routes: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == "http_requests_total")
        .filter_map(|s| s.labels.get("route").map(String::as_str))
        .collect();
    assert!(routes.contains("/api/auctions/{id}"), "{routes:?}");
    assert!(routes.contains("unmatched"), "{routes:?}");
    assert!(routes.iter().all(|r| !r.contains("12345") && !r.chars().any(|c| c.is_ascii_digit())), "{routes:?}");
    // The traffic above is counted where it should be.
    let outcomes: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == "gavel_bids_total")
        .filter_map(|s| s.labels.get("outcome").map(String::as_str))
        .collect();
    for o in ["accepted", "too_low_local", "too_low_db", "closed", "shed"] {
        assert!(outcomes.contains(o), "bid outcome {o}: {outcomes:?}");
    }
    let value = |name: &str, label: (&str, &str)| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(&format!("{}=\"{}\"", label.0, label.1)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(value("gavel_bids_total{", ("outcome", "accepted")), 1.0);
    assert_eq!(value("gavel_orders_total{", ("outcome", "reserved")), 1.0);
    assert!(
        value("gavel_bid_batch_size_count{", ("core", "0")) + value("gavel_bid_batch_size_count{", ("core", "1"))
            >= 1.0
    );
    // Where a batch's time went: its oldest bid's wait by stage, and its commit
    // beside its statement.
    for stage in ["queue", "lane", "begin"] {
        assert!(value("gavel_bid_batch_wait_seconds_count{", ("stage", stage)) >= 1.0, "bid batch wait, stage {stage}");
    }
    for query in ["place_bids", "commit_bids"] {
        assert!(value("gavel_db_query_duration_seconds_count{", ("query", query)) >= 1.0, "query {query} timed");
    }
}

/// `promtool check metrics` accepts the exposition (names, units, types, help).
#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let app = spawn_app().await;
    drive_traffic(&app).await;
    let text = app.scrape().await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus package; .ci/run installs it)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool objects:\n{said}");
}

/// Metrics are for the operator's scraper: the public port answers 404.
#[tokio::test]
async fn the_public_port_does_not_serve_metrics() {
    let app = spawn_app().await;
    assert_problem(app.get("/metrics").await, StatusCode::NOT_FOUND, "/problems/not-found").await;
    assert_ne!(app.addr, app.admin_addr);
    assert!(app.scrape().await.contains("http_requests_total"));
}
