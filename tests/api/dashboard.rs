//! The Grafana dashboard (`dashboards/gavel.json`): well formed, covering what an
//! operator watches, and asking only for metrics the server really exports.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, spawn_app};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/gavel.json");

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("read {DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every panel, rows included; a collapsed row keeps its panels inside itself.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("the dashboard has a `panels` array") {
        all.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            all.extend(inner);
        }
    }
    all
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("<untitled>")
}

/// The `$core` variable's `label_values(metric, label)` query, as `(metric, label)`.
fn core_variable(dashboard: &Value) -> (String, String) {
    let variables = dashboard["templating"]["list"].as_array().expect("template variables");
    let core = variables.iter().find(|v| v["name"] == "core").expect("a `core` variable");
    assert_eq!(core["type"], "query");
    // Grafana 10+ stores the query as an object; older versions as a string.
    let query = core["query"]["query"].as_str().or(core["query"].as_str()).expect("a query");
    let arguments = query.replace(' ', "");
    let arguments = arguments.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')'));
    match arguments.map(|a| a.split(',').collect::<Vec<_>>()).as_deref() {
        Some([metric, label]) => (metric.to_string(), label.to_string()),
        _ => panic!("`core` is not a label_values(metric, label) query: {query}"),
    }
}

/// The non-empty PromQL expressions of a panel's targets.
fn expressions(panel: &Value) -> Vec<&str> {
    let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
    targets.iter().filter_map(|t| t["expr"].as_str()).filter(|e| !e.trim().is_empty()).collect()
}

/// PromQL's aggregation operators (whitespace-separated): not metrics.
const AGGREGATIONS: &str = "\
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";

/// PromQL's binary operators, modifiers and literals, and `le`, which only a label is: not metrics.
const KEYWORDS: &str = "\
    and or unless atan2 bool offset start end inf nan le";

/// PromQL's functions: not metrics.
const FUNCTIONS: &str = "\
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp \
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg \
    delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction \
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase \
    info irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time \
    min_over_time minute month pi predict_linear present_over_time quantile_over_time rad rate resets \
    round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time \
    stdvar_over_time sum_over_time tan tanh time timestamp vector year";

/// Modifiers followed by a parenthesised list of label names, not metrics.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression reads, sorted and without repeats.
///
/// Not a parser: it drops string literals, `{…}` matchers, `[…]` ranges and
/// subqueries, numbers and durations, comments, Grafana variables (`$x`, `${x}`),
/// label lists after `by`/`on`/…, and PromQL's own words ([`AGGREGATIONS`],
/// [`KEYWORDS`], [`FUNCTIONS`]). Every other word is taken for a metric, so a
/// misspelt function shows up as a name the server does not export instead of
/// passing unseen. A name given only as `{__name__="…"}` is not seen.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let is_word_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = after_string(&chars, i);
        } else if c == '{' {
            i = after_closing(&chars, i, '}');
        } else if c == '[' {
            i = after_closing(&chars, i, ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = after_closing(&chars, i, '}');
            } else {
                while i < chars.len() && is_word(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers (0.99, 1e3, 0x1f) and durations (5m, 1h30m).
            while i < chars.len() && (is_word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_word_start(c) {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if LABEL_LISTS.contains(&word.as_str()) {
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if chars.get(j) == Some(&'(') {
                    i = after_closing(&chars, j, ')');
                }
            } else if ![AGGREGATIONS, KEYWORDS, FUNCTIONS]
                .iter()
                .any(|words| words.split_whitespace().any(|w| w == word))
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names.into_iter().collect()
}

/// The index just past the string literal that opens at `open`.
fn after_string(chars: &[char], open: usize) -> usize {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            // Backquoted strings are raw: no escapes.
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    chars.len()
}

/// The index just past the `close` that ends what opens at `open`, stepping over
/// string literals (a label value may hold `}` or `]`, as route templates do).
fn after_closing(chars: &[char], open: usize, close: char) -> usize {
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = after_string(chars, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    chars.len()
}

/// Every series name a scrape has samples for. prometheus-parse folds a
/// histogram's `_bucket` lines into one sample named after the family, so the
/// family name stands for `_bucket`, `_sum` and `_count` too.
///
/// prometheus-parse (0.2) skips any sample line with a `}` inside a label value,
/// e.g. `route="/api/auctions/{id}"`: a family is seen only through samples
/// without one, which is why the traffic below includes brace-free routes.
fn exported_names(scrape: &prometheus_parse::Scrape) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for sample in &scrape.samples {
        let suffixes: &[&str] = match sample.value {
            prometheus_parse::Value::Histogram(_) => &["", "_bucket", "_sum", "_count"],
            prometheus_parse::Value::Summary(_) => &["", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{}{suffix}", sample.metric)));
    }
    names
}

fn parse_scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the scrape parses")
}

/// Some of everything, so every family the dashboard reads has samples: an
/// auction with accepted and refused bids, a read, stock and an order, and lost
/// LISTEN connections (the reconnect counter may only appear once one happened).
async fn drive_traffic(app: &TestApp) {
    let id = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    for (bidder, amount, status) in
        [(2, 100, StatusCode::CREATED), (3, 120, StatusCode::CREATED), (4, 115, StatusCode::CONFLICT)]
    {
        assert_eq!(app.place_bid(&app.bidder(bidder), id, amount).await.status(), status, "bid of {amount}");
    }
    assert_eq!(app.auction(id, false).await["id"], id);

    let stocked = app.put_inventory(&app.seller(), "widget", "Widget", 10).await;
    assert_eq!(stocked.status(), StatusCode::CREATED);
    let ordered = app.place_order(&app.bidder(5), &[("widget", 2)], None).await;
    assert_eq!(ordered.status(), StatusCode::CREATED);

    app.wait_for_listeners().await;
    assert_eq!(app.kill_listeners().await, 2);
    app.wait_for_listeners().await;
}

/// The file is JSON, every panel queries something, and no two panels share an id.
#[test]
fn the_dashboard_is_json_with_a_query_in_every_panel_and_unique_ids() {
    let dashboard = dashboard();
    let panels = panels(&dashboard);
    assert!(panels.iter().filter(|p| !is_row(p)).count() >= 10, "the dashboard has its panels");

    let mut seen = HashSet::new();
    let duplicates: Vec<String> = panels
        .iter()
        .filter(|p| !seen.insert(p["id"].as_u64().unwrap_or_else(|| panic!("panel {:?} has no id", title(p)))))
        .map(|p| format!("{} ({})", p["id"], title(p)))
        .collect();
    assert!(duplicates.is_empty(), "panels whose id is taken: {duplicates:?}");

    let without_query: Vec<&str> =
        panels.iter().filter(|p| !is_row(p) && expressions(p).is_empty()).map(|p| title(p)).collect();
    assert!(without_query.is_empty(), "panels without a non-empty `expr`: {without_query:?}");
}

/// The panels an operator looks for are there, under the rows they expect.
#[test]
fn the_dashboard_covers_traffic_latency_bidding_pool_balance_and_memory() {
    let dashboard = dashboard();
    let panels = panels(&dashboard);
    let titles: Vec<String> = panels.iter().filter(|p| !is_row(p)).map(|p| title(p).to_lowercase()).collect();
    let wanted: &[&[&str]] = &[
        &["requests per second"],
        &["error ratio", "5xx"],
        &["error ratio", "4xx"],
        &["latency", "p50"],
        &["latency", "p99"],
        &["bids", "outcome"],
        &["bid batch size"],
        &["bid wait", "stage"],
        &["order batch size"],
        &["pool"],
        &["per-core", "balance"],
        &["memory"],
    ];
    let missing: Vec<String> = wanted
        .iter()
        .filter(|words| !titles.iter().any(|t| words.iter().all(|w| t.contains(w))))
        .map(|words| words.join(" + "))
        .collect();
    assert!(missing.is_empty(), "no panel title has {missing:?}; titles: {titles:?}");

    let rows: Vec<&str> = panels.iter().filter(|p| is_row(p)).map(|p| title(p)).collect();
    assert_eq!(rows, ["Traffic", "Latency", "Bidding", "Orders", "Database", "Caches", "Process"]);

    let balance = panels.iter().find(|p| title(p).to_lowercase().contains("balance")).unwrap();
    assert_eq!(balance["type"], "stat", "the per-core balance is one number");
}

/// Every panel asks the data source chosen in `${DS_PROMETHEUS}`, and `$core`
/// offers the cores the server reports.
#[test]
fn the_dashboard_is_parameterised_by_data_source_and_core() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().expect("template variables");
    let source = variables.iter().find(|v| v["name"] == "DS_PROMETHEUS").expect("a `DS_PROMETHEUS` variable");
    assert_eq!(source["type"], "datasource");
    assert_eq!(source["query"], "prometheus");
    assert_eq!(core_variable(&dashboard), ("http_requests_total".to_owned(), "core".to_owned()));

    let elsewhere: Vec<&str> = panels(&dashboard)
        .into_iter()
        .filter(|p| !is_row(p))
        .filter(|p| {
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            std::iter::once(&p["datasource"])
                .chain(targets.iter().map(|t| &t["datasource"]))
                .any(|d| d["uid"] != "${DS_PROMETHEUS}")
        })
        .map(title)
        .collect();
    assert!(elsewhere.is_empty(), "panels not on ${{DS_PROMETHEUS}}: {elsewhere:?}");
}

#[test]
fn metric_names_leave_out_functions_labels_ranges_and_variables() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{core=~"$core"}[5m])))"#
        ),
        ["http_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names(
            r#"sum without (status) (rate(http_requests_total{route="/api/auctions/{id}", method=~"P[A-Z]+\"}"}[$__rate_interval] offset 5m))
               / on (core) group_left (version) sum by (core, version) (gavel_build_info) > bool ${threshold} # rate(not_a_metric[1m])"#
        ),
        ["gavel_build_info", "http_requests_total"]
    );
    assert_eq!(metric_names("time() - process_start_time_seconds"), ["process_start_time_seconds"]);
    assert_eq!(
        metric_names(
            "sum(rate(gavel_bid_batch_size_sum[1m])) / sum(rate(gavel_bid_batch_size_count[1m])) or vector(0)"
        ),
        ["gavel_bid_batch_size_count", "gavel_bid_batch_size_sum"]
    );
    assert_eq!(metric_names("max_over_time(min by (core) (gavel_cache_live)[10m:30s]) * 1e-3"), ["gavel_cache_live"]);
}

#[test]
fn metric_names_keep_words_they_do_not_know() {
    // A misspelt function is not passed over as a function: it is reported, and fails the check below.
    assert_eq!(metric_names("rat(http_requests_total[1m])"), ["http_requests_total", "rat"]);
    assert_eq!(metric_names("sum(rate(http_request_total[1m]))"), ["http_request_total"]);
}

/// Every PromQL expression (and the `$core` variable's query) refers only to
/// metrics the server really exports, after traffic that exercises them.
#[tokio::test]
async fn every_promql_expression_refers_only_to_metrics_the_server_exports() {
    let dashboard = dashboard();
    // Metric name -> titles of the panels that read it.
    let mut used: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for panel in panels(&dashboard) {
        for expr in expressions(panel) {
            for name in metric_names(expr) {
                used.entry(name).or_default().insert(title(panel));
            }
        }
    }
    let (core_metric, core_label) = core_variable(&dashboard);
    used.entry(core_metric.clone()).or_default().insert("$core variable");
    assert!(used.len() >= 10, "the dashboard reads metrics: {used:?}");

    let app = spawn_app().await;
    drive_traffic(&app).await;

    // Some samples are recorded after the response has gone (request durations)
    // or when a notification lands (cache lag), so give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let scrape = loop {
        let scrape = parse_scrape(&app.scrape().await);
        let exported = exported_names(&scrape);
        let missing: Vec<String> = used
            .iter()
            .filter(|(name, _)| !exported.contains(*name))
            .map(|(name, titles)| format!("{name} (in {titles:?})"))
            .collect();
        if missing.is_empty() {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard reads metrics the server does not export:\n  {}\nexported: {exported:?}",
            missing.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // `$core` lists the values a label takes, so the samples must carry it.
    assert!(
        scrape.samples.iter().any(|s| s.metric == core_metric && s.labels.get(&core_label).is_some()),
        "{core_metric} has a `{core_label}` label, which `$core` lists"
    );
}
